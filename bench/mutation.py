"""Mutation score of the modules that decide the numbers (mutmut), with a fast, targeted test set per module.

Not in CI: a full run takes most of an hour on this project's 2-core machine. Each module is mutated in its own
scratch folder under bench/out/mutation/<module>/ (links to the repository, plus a pyproject.toml with the
module's [tool.mutmut] section), so the repository's own pyproject.toml carries no mutmut settings and the
source files carry no pragmas. Only the functions listed in TARGETS are mutated where a module lists any
(train.py: the data path, not the Trainer wiring; scoring.py: the math, not the run's files and ranks).

Mutants whose only change is message text (an exception's arguments, an assert message, a log/warnings call,
a progress bar's text) still run but are counted apart and left out of the score: see `is_message_mutant`.
Score = (killed + timeout) / (mutants - message mutants - unchecked); "no tests" (the function is not reached by
the module's fast tests) and "suspicious" count as not killed.

    python bench/mutation.py                              # every module, <= 60 min
    python bench/mutation.py --modules loss,selection     # a subset
    python bench/mutation.py --list                       # the targets and their tests, without running

Writes bench/out/mutation.json (figures and every mutant's status) and bench/out/mutation-survivors.txt (the
diff of every mutant not killed, with the original file's line numbers).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
WORK = OUT / "mutation"


@dataclass
class Target:
    path: str  # the module's file, relative to the repository root
    tests: list[str]  # pytest arguments: files (globs allowed) and options such as -k
    functions: list[str] = field(default_factory=list)  # "f" or "Class.method"; empty: every function


# The slow tests deselected here run other processes (not seen by mutmut's per-test tracking, and 10-130 s each)
# or build a whole world (~60 s a mutant).
TARGETS = {
    "loss": Target("atlantis/loss.py", ["tests/test_loss.py", "tests/test_mutants_loss.py"]),
    "weights": Target(
        "atlantis/weights.py", ["tests/test_weights.py", "tests/test_bad_inputs.py", "tests/test_mutants_weights.py"]
    ),
    "selection": Target(
        "atlantis/selection.py",
        ["tests/test_selection.py", "tests/test_selection_upstream.py", "tests/test_mutants_selection.py"],
    ),
    "train": Target(
        "atlantis/train.py",
        [
            "tests/test_train_data_path.py",
            "tests/test_train.py",
            "tests/test_mutants_train.py",
            "-k",
            "not two_processes and not keep_checkpoints and not lora and not resume_with_other",
        ],
        [
            "WeightedSFTDataset.__init__",
            "WeightedSFTDataset.__len__",
            "WeightedSFTDataset.__getitem__",
            "build_dataset",
            "WeightedCollator.__call__",
            "_chunk_nll",
            "response_token_nll",
        ],
    ),
    "scoring": Target(
        "atlantis/scoring.py",
        ["tests/test_scoring.py", "tests/test_mutants_scoring.py", "-k", "not torchrun"],
        [
            "columns",
            "text_hash",
            "response_logprobs",
            "reference_logprob",
            "make_batches",
            "collate",
            "_Scorer.score_shard",
            "_Scorer._verify",
        ],
    ),
    "world.metrics": Target(
        "atlantis/world/metrics.py",
        [
            "tests/test_world.py",
            "tests/test_world_metrics*.py",
            "tests/test_mutants_world_metrics.py",
            "-k",
            "not built_models and not rebuild and not reduced_experiment and not oracle and not shipped_world",
        ],
    ),
}

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout"}
STATUS |= {None: "not checked", 2: "not checked", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout"}
STATUS |= {37: "caught by type check", -11: "segfault", -9: "segfault"}
LOG_OBJECTS = {"log", "logger", "logging", "warnings"}
BAR_TEXT = {"set_postfix", "set_description", "set_postfix_str", "write"}


# ------------------------------------------------------------------------------------------ message mutants


class _StripMessages(ast.NodeTransformer):
    """Drops what is only shown to a person: exception arguments, assert messages, log and progress-bar text."""

    def visit_Raise(self, node: ast.Raise) -> ast.Raise:
        if isinstance(node.exc, ast.Call):
            node.exc.args, node.exc.keywords = [], []
        return self.generic_visit(node)

    def visit_Assert(self, node: ast.Assert) -> ast.Assert:
        node.msg = None
        return self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        f = node.func
        if isinstance(f, ast.Attribute) and (
            (isinstance(f.value, ast.Name) and f.value.id in LOG_OBJECTS) or f.attr in BAR_TEXT
        ):
            node.args, node.keywords = [], []
        return self.generic_visit(node)


def _normalised(source: str) -> str:
    tree = ast.parse(_dedent(source))
    fn = tree.body[0]
    fn.name = "f"
    return ast.dump(_StripMessages().visit(fn))


def _dedent(source: str) -> str:
    lines = source.splitlines()
    indent = min(len(x) - len(x.lstrip()) for x in lines if x.strip())
    return "\n".join(x[indent:] for x in lines)


def is_message_mutant(original: str, mutant: str) -> bool:
    """True when the mutant differs from the original function only in text shown to a person."""
    return _normalised(original) == _normalised(mutant)


# ----------------------------------------------------------------------------------------------- running


def mangled(module: str, function: str) -> str:
    """mutmut's name for a function: pkg.mod.x_f, or pkg.mod.xǁClassǁmethod."""
    if "." in function:
        cls, meth = function.split(".")
        return f"{module}.x\u01c1{cls}\u01c1{meth}"
    return f"{module}.x_{function}"


def unwrap_no_grad(source: str) -> tuple[str, list[int]]:
    """`@torch.no_grad()` on a function becomes `with torch.no_grad():` around its body, and the line map back.

    mutmut leaves every decorated function unmutated (a decorator runs at import), which would leave out
    scoring.response_logprobs, scoring.reference_logprob and metrics.continuation_logliks. The two forms compute
    the same. Returns the rewritten source and, for each of its lines (1-based, index 0 unused), the line of the
    original file: the body keeps its line numbers, the `def` moves up one line, `with` stands for the decorator.
    """
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source)
    edits = []  # (decorator line, first statement line, last line)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and [ast.unparse(d) for d in node.decorator_list] == ["torch.no_grad()"]:
            body = node.body[1:] if ast.get_docstring(node) is not None else node.body
            edits.append((node.decorator_list[0].lineno, body[0].lineno, node.end_lineno))
    line_map = list(range(len(lines) + 1))
    for deco, first, last in reversed(edits):
        indent = lines[first - 1][: len(lines[first - 1]) - len(lines[first - 1].lstrip())]
        inner = [("    " + x if x.strip() else x) for x in lines[first - 1 : last]]
        lines[deco - 1 : last] = lines[deco : first - 1] + [f"{indent}with torch.no_grad():\n"] + inner
        line_map[deco : last + 1] = line_map[deco + 1 : first] + [deco] + line_map[first : last + 1]
    out = "".join(lines)
    before = [ast.dump(n) for n in tree.body if not isinstance(n, ast.FunctionDef) or not n.decorator_list]
    after = [ast.dump(n) for n in ast.parse(out).body if not isinstance(n, ast.FunctionDef) or not n.decorator_list]
    assert len(line_map) == len(out.splitlines()) + 1 and len(before) == len(after) - len(edits), "bad rewrite"
    return out, line_map


def prepare(name: str, target: Target) -> Path:
    """A scratch folder whose pyproject.toml tells mutmut what to mutate and which tests to run."""
    work = WORK / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    tops = sorted({p.split("/")[0] for p in tracked.splitlines()} - {"bench", "pyproject.toml", ".gitignore"})
    for top in tops:
        if top == "atlantis":  # a copy: the target module is rewritten for mutmut (see `unwrap_no_grad`)
            shutil.copytree(ROOT / top, work / top, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (work / top).symlink_to(ROOT / top)
    source, line_map = unwrap_no_grad((ROOT / target.path).read_text())
    (work / target.path).write_text(source)
    (work / "lines.json").write_text(json.dumps(line_map))
    tests: list[str] = []
    for arg in target.tests:
        if "*" in arg:
            tests += sorted(glob.glob(arg, root_dir=ROOT))
        else:
            tests.append(arg)
    mutmut = {
        "source_paths": ["atlantis"],
        "only_mutate": [target.path],
        "also_copy": [t for t in tops if t not in ("atlantis", "tests")],
        "pytest_add_cli_args_test_selection": tests,
        "pytest_add_cli_args": ["-p", "no:cacheprovider"],
        "use_git_change_detection": False,
    }
    text = (ROOT / "pyproject.toml").read_text() + "\n[tool.mutmut]\n"
    text += "".join(f"{k} = {json.dumps(v, ensure_ascii=False)}\n" for k, v in mutmut.items())
    (work / "pyproject.toml").write_text(text)
    return work


def run_mutmut(work: Path, target: Target, module: str, deadline: float, log_path: Path) -> tuple[bool, float]:
    """Runs mutmut in `work`; stops it at `deadline`. Returns (finished, seconds)."""
    patterns = [mangled(module, f) + "__mutmut_*" for f in target.functions]
    cmd = [str(Path(sys.executable).parent / "mutmut"), "run", "--max-children", "1", *patterns]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # the mutated copy under mutants/ must be the one imported
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
            finished = proc.returncode == 0
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            finished = False
    return finished, time.monotonic() - start


def _functions(work: Path, target: Target) -> dict[str, str]:
    """Generated function name -> its source, read through mutmut's line index of the mutated file."""
    mutated = work / "mutants" / target.path
    spans = json.loads(mutated.with_name(mutated.name + ".spans").read_text())["spans"]
    lines = mutated.read_text().splitlines(keepends=True)
    return {name: "".join(lines[a - 1 : b]) for name, (a, b) in spans.items()}


def _def_lines(path: Path) -> dict[str, int]:
    """'f' / 'Class.method' -> line of its `def` in the original file."""
    out = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            out[node.name] = node.lineno
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef):
                    out[f"{node.name}.{sub.name}"] = sub.lineno
    return out


def _diff(original: str, mutant: str, def_line: int, line_map: list[int]) -> tuple[list[int], str]:
    """Changed lines (in the original file) and a unified diff numbered like the original file.

    `def_line`: the function's `def` in the mutated copy; `line_map`: its lines -> the original file's."""
    a, b = original.splitlines(), mutant.splitlines()
    offset = def_line - next(i for i, x in enumerate(a) if x.lstrip().startswith(("def ", "async def ")))
    # the generated names (x_f__mutmut_orig, x_f__mutmut_3) are no difference; a default on the def line may be
    a, b = ([re.sub(r"\b(x_|x\u01c1\w+\u01c1)(\w+?)__mutmut_(orig|\d+)\b", r"\2", x) for x in s] for s in (a, b))
    changed, body = [], []
    for group in difflib.SequenceMatcher(None, a, b).get_grouped_opcodes(1):
        body.append(f"@@ line {line_map[group[0][1] + offset]} @@")
        for tag, x1, x2, y1, y2 in group:
            if tag == "equal":
                body += [f"  {x}" for x in a[x1:x2]]
                continue
            changed += [line_map[i] for i in range(x1 + offset, max(x2, x1 + 1) + offset)]
            body += [f"- {x}" for x in a[x1:x2]] + [f"+ {y}" for y in b[y1:y2]]
    return sorted(set(changed)), "\n".join(body)


def one_line(diff: str) -> str:
    """`before` -> `after` of a diff from `_diff`, each side's changed lines joined."""
    before = " / ".join(x[2:].strip() for x in diff.splitlines() if x.startswith("- "))
    after = " / ".join(x[2:].strip() for x in diff.splitlines() if x.startswith("+ "))
    return f"{before}  ->  {after}"


def collect(work: Path, target: Target, module: str) -> list[dict]:
    meta = json.loads((work / "mutants" / (target.path + ".meta")).read_text())
    sources = _functions(work, target)
    defs = _def_lines(work / target.path)
    lines_file = work / "lines.json"  # absent in folders of an earlier version of this script: no rewrite then
    line_map = json.loads(lines_file.read_text()) if lines_file.exists() else list(range(10**6))
    wanted = {mangled(module, f) for f in target.functions}
    rows = []
    for key, code in meta["exit_code_by_key"].items():
        base, _, _n = key.rpartition("__mutmut_")
        if wanted and base not in wanted:
            continue
        short = base.rpartition(".")[-1]
        fn = short[2:] if short.startswith("x_") else short[1:].strip("\u01c1").replace("\u01c1", ".")
        gen = key.rpartition(".")[-1]
        original, mutant = sources[short + "__mutmut_orig"], sources[gen]
        lines, diff = _diff(original, mutant, defs[fn], line_map)
        rows.append(
            {
                "mutant": key,
                "function": fn,
                "status": STATUS.get(code, "suspicious"),
                "message": is_message_mutant(original, mutant),
                "lines": lines,
                "seconds": meta["durations_by_key"].get(key),
                "mutation": one_line(diff),
                "diff": diff,
            }
        )
    return rows


def summarise(rows: list[dict]) -> dict:
    count = {s: 0 for s in ("killed", "survived", "no tests", "timeout", "suspicious", "not checked")}
    msg = {"total": 0, "killed": 0}
    for r in rows:
        if r["message"]:
            msg["total"] += 1
            msg["killed"] += r["status"] in ("killed", "timeout")
            continue
        s = r["status"] if r["status"] in count else "suspicious"
        count[s] += 1
    scored = sum(count.values()) - count["not checked"]
    detected = count["killed"] + count["timeout"]
    all_checked = len(rows) - count["not checked"]
    return {
        "mutants": len(rows),
        **count,
        "message": msg["total"],
        "message_killed": msg["killed"],
        "score": round(100 * detected / scored, 1) if scored else None,
        "score_with_messages": round(100 * (detected + msg["killed"]) / all_checked, 1) if all_checked else None,
    }


def table(results: dict) -> str:
    head = ("module", "mutants", "killed", "survived", "no tests", "timeout/susp.", "msg (killed)", "score %", "min")
    out = [head]
    for name, r in results.items():
        s = r["summary"]
        out.append(
            (
                name,
                str(s["mutants"]),
                str(s["killed"]),
                str(s["survived"]),
                str(s["no tests"]),
                f"{s['timeout']}/{s['suspicious']}",
                f"{s['message']} ({s['message_killed']})",
                "-" if s["score"] is None else f"{s['score']:.1f}" + ("" if r["finished"] else " (partial)"),
                f"{r['seconds'] / 60:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in out) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in out
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modules", default=",".join(TARGETS), help=f"comma-separated subset of {', '.join(TARGETS)}")
    p.add_argument("--max-minutes", type=float, default=60.0, help="stop mutating when this much wall time is spent")
    p.add_argument("--list", action="store_true", help="print the targets and their tests, and exit")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: re-read the results mutmut left in bench/out/mutation/ and rewrite the report",
    )
    args = p.parse_args(argv)
    names = [m.strip() for m in args.modules.split(",") if m.strip()]
    unknown = [m for m in names if m not in TARGETS]
    if unknown:
        p.error(f"unknown module(s) {unknown}; known: {', '.join(TARGETS)}")
    if args.list:
        for n in names:
            t = TARGETS[n]
            print(f"{n}: {t.path} [{', '.join(t.functions) or 'every function'}] <- {' '.join(t.tests)}")
        return 0
    report = _report_only(names) if args.report_only else _run(names, args.max_minutes)
    (OUT / "mutation.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    with open(OUT / "mutation-survivors.txt", "w") as f:
        for messages in (False, True):
            f.write("# ---- message text only (not in the score)\n\n" if messages else "")
            for r in report["modules"].values():
                for m in r["mutants"]:
                    if m["status"] in ("killed", "timeout") or m["message"] != messages:
                        continue
                    where = f"{r['path']}:{','.join(map(str, m['lines']))}"
                    f.write(f"# {where} {m['function']} {m['mutant']}: {m['status']}\n{m['diff']}\n\n")
    print()
    print(table(report["modules"]))
    print(
        f"\nwall time {report['wall_seconds'] / 60:.1f} min, commit {report['commit'][:12]}, {report['date']}; "
        f"{OUT / 'mutation.json'}, {OUT / 'mutation-survivors.txt'}"
    )
    return 0


def _module_result(name: str, rows: list[dict], finished: bool, seconds: float) -> dict:
    target = TARGETS[name]
    return {
        "path": target.path,
        "functions": target.functions,
        "tests": target.tests,
        "finished": finished,
        "seconds": round(seconds, 1),
        "summary": summarise(rows),
        "mutants": rows,
    }


def _run(names: list[str], max_minutes: float) -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    OUT.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 60 * max_minutes
    started = datetime.now(timezone.utc)
    results: dict[str, dict] = {}
    for name in names:
        target = TARGETS[name]
        module = target.path.removesuffix(".py").replace("/", ".")
        if time.monotonic() >= deadline:
            print(f"{name}: skipped, --max-minutes {max_minutes:g} spent")
            continue
        work = prepare(name, target)
        log_path = OUT / f"mutation-{name}.log"
        print(f"{name}: mutating {target.path} ({len(target.functions) or 'every'} function(s)); log {log_path}")
        finished, seconds = run_mutmut(work, target, module, deadline, log_path)
        try:
            rows = collect(work, target, module)
        except FileNotFoundError as e:
            print(f"{name}: mutmut left no results ({e}); see {log_path}")
            continue
        results[name] = _module_result(name, rows, finished, seconds)
        s = results[name]["summary"]
        print(f"{name}: {s['score']}% of {s['mutants'] - s['message']} mutants killed in {seconds / 60:.1f} min")
    return {
        "date": started.isoformat(timespec="seconds"),
        "commit": commit,
        "wall_seconds": round((datetime.now(timezone.utc) - started).total_seconds()),
        "mutmut": _version("mutmut"),
        "modules": results,
    }


def _report_only(names: list[str]) -> dict:
    """The last run's report, its mutants re-read (e.g. after a change to the classification here)."""
    report = json.loads((OUT / "mutation.json").read_text())
    for name in names:
        target = TARGETS[name]
        work, old = WORK / name, report["modules"].get(name)
        if old is None or not (work / "mutants").is_dir():
            continue
        rows = collect(work, target, target.path.removesuffix(".py").replace("/", "."))
        report["modules"][name] = _module_result(name, rows, old["finished"], old["seconds"])
    return report


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
