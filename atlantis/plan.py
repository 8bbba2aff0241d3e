"""A replication plan: job counts and GPU-hours per workflow rule, from the jobs the workflow expands.

GPU-hours are each job's GPUs × its expected runtime, both from the config (`presets`, `scoring`): Table 6
gives the GPUs per model size; the runtimes are the config's estimates, not numbers from the paper.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable


def plan_table(jobs: Iterable[tuple[str, int, float]], profile: str) -> str:
    """Markdown: one row per rule (jobs, GPUs per job, GPU-hours), then the total; jobs are (rule, gpus, hours)."""
    by_rule: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for rule, gpus, hours in jobs:
        if gpus < 0 or hours < 0:
            raise ValueError(f"rule {rule}: negative GPUs or hours ({gpus}, {hours})")
        by_rule[rule].append((gpus, hours))
    lines = [
        f"# Plan: profile `{profile}`",
        "",
        "| rule | jobs | GPUs per job | GPU-hours |",
        "|---|---|---|---|",
    ]
    total_jobs, total_hours = 0, 0.0
    for rule in sorted(by_rule):
        items = by_rule[rule]
        gpus = sorted({g for g, _ in items})
        hours = sum(g * h for g, h in items)
        total_jobs += len(items)
        total_hours += hours
        lines.append(f"| {rule} | {len(items)} | {', '.join(map(str, gpus))} | {hours:,.0f} |")
    lines.append(f"| **total** | {total_jobs} | | {total_hours:,.0f} |")
    return "\n".join(lines) + "\n"
