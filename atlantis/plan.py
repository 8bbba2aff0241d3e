"""A replication plan a lab can budget from: GPU-hours, node-hours, wall-clock and the judge's calls and cost.

Every job's estimate comes from `atlantis.resources` (FLOPs over achieved FLOP/s on the configured cluster), the same
numbers the workflow gives SLURM as each job's resources and time limit; the judge's calls and tokens per model are
the config's `estimates.judge` (each benchmark's protocol: MT-Bench 80 questions x 2 turns, both orders in pairwise;
AlpacaEval one call per instruction; Arena-Hard both positions) and its prices per million tokens.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from atlantis.resources import Cluster

# the workflow's stages, in order: a stage starts when the one before it has finished (its critical path)
STAGES = [("score",), ("weights", "select"), ("train",), ("answers", "lmeval", "lmeval_proxy")]


@dataclass(frozen=True)
class PlannedJob:
    rule: str
    gpus: int
    nodes: int
    hours: float  # estimated run time
    limit_minutes: int  # the SLURM time limit it is submitted with
    mem_mb: int = 0  # per node
    note: str = ""

    def __post_init__(self) -> None:
        if self.gpus < 0 or self.nodes < 0 or self.hours < 0 or self.limit_minutes < 0:
            raise ValueError(f"rule {self.rule}: negative resources ({self})")


@dataclass(frozen=True)
class JudgeWork:
    benchmark: str
    judge: str  # the judge model (its price)
    models: int  # models judged
    calls_per_model: int
    input_tokens: int  # per call
    output_tokens: int  # per call
    usd_per_m_input: float
    usd_per_m_output: float

    @property
    def calls(self) -> int:
        return self.models * self.calls_per_model

    @property
    def cost(self) -> float:
        per_call = self.input_tokens * self.usd_per_m_input + self.output_tokens * self.usd_per_m_output
        return self.calls * per_call / 1e6


def _gpu_h(jobs: list[PlannedJob], rules: tuple[str, ...]) -> float:
    return sum(j.gpus * j.hours for j in jobs if j.rule in rules)


def node_hours(job: PlannedJob, cluster: Cluster) -> float:
    """Whole nodes for multi-node jobs; a job on part of a node counts its share of the node's GPUs."""
    if cluster.cpu_only or job.gpus >= cluster.gpus_per_node:
        return max(job.nodes, 1) * job.hours
    return job.gpus / cluster.gpus_per_node * job.hours


def plan_report(
    jobs: Iterable[PlannedJob],
    judge: Iterable[JudgeWork],
    cluster: Cluster,
    profile: str,
    assumptions: dict | None = None,
    alternatives: list[tuple[str, str]] | None = None,
) -> str:
    """Markdown: per rule and in total, jobs, GPUs per job, GPU-hours, node-hours, longest job and time limit; the
    wall-clock on the configured cluster; the judge's calls, tokens and cost."""
    jobs, judge = list(jobs), list(judge)
    by_rule: dict[str, list[PlannedJob]] = defaultdict(list)
    for job in jobs:
        by_rule[job.rule].append(job)
    unit = "CPU node" if cluster.cpu_only else cluster.gpu
    lines = [
        f"# Plan: profile `{profile}`",
        "",
        f"Cluster: {cluster.nodes} nodes x {cluster.gpus_per_node} {unit} ({cluster.gpu_mem_gb:g} GB), "
        f"{cluster.ram_per_node_gb:g} GB RAM and {cluster.cpus_per_node} CPUs per node, peak "
        f"{cluster.peak_tflops:g} TFLOP/s per {'node' if cluster.cpu_only else 'GPU'}; assumed MFU: training "
        f"{cluster.mfu_train:g} ({cluster.mfu_train_offload:g} with offload), forward {cluster.mfu_forward:g}, "
        f"decoding {cluster.mfu_generate:g}. Time limits: estimate x {cluster.time_margin:g} (x attempt on retry).",
        "",
        "| rule | jobs | GPUs per job | GPU-hours | node-hours | longest job (h) | its time limit (h) |",
        "|---|---|---|---|---|---|---|",
    ]
    total_gpu_h = total_node_h = 0.0
    for rule in sorted(by_rule):
        items = by_rule[rule]
        gpus = sorted({j.gpus for j in items})
        gpu_h = sum(j.gpus * j.hours for j in items)
        node_h = sum(node_hours(j, cluster) for j in items)
        longest = max(items, key=lambda j: j.hours)
        total_gpu_h += gpu_h
        total_node_h += node_h
        lines.append(
            f"| {rule} | {len(items)} | {', '.join(map(str, gpus))} | {gpu_h:,.1f} | {node_h:,.1f} | "
            f"{longest.hours:,.1f} | {longest.limit_minutes / 60:,.1f} |"
        )
    lines.append(f"| **total** | {len(jobs)} | | {total_gpu_h:,.0f} | {total_node_h:,.0f} | | |")
    lines.append(
        f"| **training / scoring / evaluation** | | | {_gpu_h(jobs, ('train',)):,.0f} / {_gpu_h(jobs, ('score',)):,.0f}"
        f" / {_gpu_h(jobs, ('answers', 'lmeval', 'lmeval_proxy')):,.0f} | | | |"
    )
    # wall-clock: the stages run one after another (each as long as its longest job), and no faster than the
    # cluster's capacity allows
    path = sum(max((j.hours for j in jobs if j.rule in stage), default=0.0) for stage in STAGES)
    capacity = total_node_h / max(cluster.nodes, 1)
    wall = max(path, capacity)
    lines += [
        "",
        f"**Wall-clock on {cluster.nodes} nodes: ~{wall:,.0f} h ({wall / 24:,.1f} days)**: the longer of the critical "
        f"path (longest scoring + training + evaluation job: {path:,.0f} h) and the node-hours over the nodes "
        f"({capacity:,.0f} h), assuming jobs pack perfectly and never wait in the queue.",
    ]
    limit_h = cluster.max_hours or 48
    long = sorted({j.rule for j in jobs if j.limit_minutes / 60 > limit_h})
    if long:
        n = sum(j.limit_minutes / 60 > limit_h for j in jobs)
        lines += [
            "",
            f"**{n} job(s) ask for more than {limit_h:g} h** (rules: {', '.join(long)})"
            + (
                "; many partitions stop there: set `cluster.max_hours` to yours to have such jobs refused at planning."
                if not cluster.max_hours
                else "."
            ),
        ]
    if judge:
        lines += [
            "",
            "## Judge",
            "",
            "| benchmark | judge | models | calls | input tokens | output tokens | cost (USD) |",
            "|---|---|---|---|---|---|---|",
        ]
        for w in judge:
            lines.append(
                f"| {w.benchmark} | {w.judge} | {w.models} | {w.calls:,} | {w.calls * w.input_tokens:,} | "
                f"{w.calls * w.output_tokens:,} | {w.cost:,.0f} |"
            )
        lines.append(
            f"| **total** | | | {sum(w.calls for w in judge):,} | {sum(w.calls * w.input_tokens for w in judge):,} | "
            f"{sum(w.calls * w.output_tokens for w in judge):,} | {sum(w.cost for w in judge):,.0f} |"
        )
    if alternatives:
        lines += ["", "## Training: ZeRO-3 with and without offload", "", *[f"- {a}: {b}" for a, b in alternatives]]
    if assumptions:
        lines += ["", "## Assumptions (config `estimates:`, `cluster:`; not measured here)", ""]
        lines += [f"- `{k}`: {v}" for k, v in assumptions.items()]
    return "\n".join(lines) + "\n"
