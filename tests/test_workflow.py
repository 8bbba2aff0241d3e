"""The Snakemake workflow: the paper's plan (dry-run) has exactly the paper's jobs; the tiny target runs."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def _dry_run(*args: str, cwd: Path = ROOT) -> str:
    out = subprocess.run(
        [*SNAKEMAKE, "-n", "--printshellcmds", "--snakefile", str(ROOT / "Snakefile"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _job_counts(text: str) -> dict[str, int]:
    table = text[text.index("Job stats:") :]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


def test_paper_plan_has_the_papers_jobs():
    text = _dry_run("--configfile", "config/paper.yaml")
    # Table 2: 3 x {SFT, ATLANTIS}; Table 3: 2 models x 2 selectors x 3 rates x 2; Table 4: 2; Table 5: 2 x 2
    counts = _job_counts(text)
    assert {k: counts[k] for k in ("train", "score", "select", "weights")} == {
        "train": 36,
        "score": 18,
        "select": 12,
        "weights": 5,
    }
    # the benchmarks: lm-eval for the 36 runs and Table 7's proxy; MT-Bench in one FastChat pass; AlpacaEval easy
    # and hard and Arena-Hard-Auto for Table 2's 6 runs; answers for each question set; the packages' data
    assert {
        k: counts[k] for k in ("lmeval", "lmeval_proxy", "mtbench", "alpacaeval", "arena_hard", "answers", "fetch")
    } == {
        "lmeval": 36,
        "lmeval_proxy": 1,
        "mtbench": 1,
        "alpacaeval": 12,
        "arena_hard": 6,
        "answers": 37 + 6 + 6,
        "fetch": 6,
    }
    assert counts["tables"] == counts["figures"] == 1
    assert counts["judge_check"] == 1  # every judge endpoint and key, before any answer is generated
    answers = re.findall(r"rule answers:\n    input: (.*)", text)
    assert answers and all("results/paper/logs/judges.checked" in a for a in answers)
    scores = re.findall(r"atlantis score model=(\S+) role=\S+ data=\S+ out=\S+ ?(.*?) >", text)
    assert len(scores) == 18 and len(set(scores)) == 18  # every scoring pass once
    trains = re.findall(r"atlantis train .*", text)
    assert sum("method=atlantis" in t for t in trains) == 3 + 12 + 2 + 2  # Tables 2, 3, 4, 5
    assert sum("subset=" in t for t in trains) == 24
    # Table 4: Qwen2-7B trained on Gemma2's weights and the reverse
    assert any("model=Qwen/Qwen2-7B " in t and "weights/gemma2.parquet" in t for t in trains)
    assert any("model=google/gemma-2-9b " in t and "weights/qwen2.parquet" in t for t in trains)


def test_tiny_plan_is_the_same_matrix(tmp_path):
    # from an empty folder, so every job is planned whatever this checkout has already run
    _tiny_config(tmp_path)
    counts = _job_counts(_dry_run("--configfile", "config.yaml", cwd=tmp_path))
    # the paper's 32 runs of Tables 2-5 over the tiny models, plus 2 more seeds of Table 2's 4 runs
    # 40 runs and 3 fixed benchmark models (baselines / references) graded by the world
    assert counts["train"] == 40 and counts["world_evaluate"] == 43 and counts["weights"] == 2
    assert counts["world_evaluate_proxy"] == 1  # Table 7
    # lm-eval: the 40 runs in one process, the proxy apart; MT-Bench: one FastChat pass over all 41
    assert (counts["lmeval"], counts["lmeval_proxy"], counts["mtbench"]) == (1, 1, 1)
    assert (counts["alpacaeval"], counts["arena_hard"]) == (24, 12)
    assert counts["tables"] == counts["figures"] == counts["matrix"] == 1


def test_report_rule_renders_every_paper_table():
    from atlantis.report import TABLES

    common = (ROOT / "workflow" / "rules" / "common.smk").read_text()
    listed = re.search(r"^TABLES = (\[.*\])$", common, re.M)
    assert listed and eval(listed[1]) == list(TABLES)  # the rule's outputs are the report's tables


def test_rule_graph_names_every_rule():
    out = subprocess.run(
        [*SNAKEMAKE, "--rulegraph", "--snakefile", str(ROOT / "Snakefile")], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rules = ("score", "weights", "select", "train", "world_evaluate", "world_evaluate_proxy", "tables", "figures")
    for rule in rules + ("lmeval", "mtbench", "alpacaeval", "arena_hard"):
        assert f'label = "{rule}"' in out.stdout, rule


def test_lint_is_clean():
    out = subprocess.run(
        [*SNAKEMAKE, "--lint", "--snakefile", str(ROOT / "Snakefile")], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_every_shipped_config_loads():
    for path in (ROOT / "config").glob("*.yaml"):
        cfg = yaml.safe_load(path.read_text())
        assert {"profile", "sft", "families", "large", "experiments"} <= set(cfg), path
        for large in cfg["large"].values():
            assert large["family"] in cfg["families"] and large["preset"] in cfg["presets"]


def _tiny_config(tmp_path: Path) -> None:
    """config.yaml in tmp_path: the tiny profile with absolute paths and 3 training steps."""
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    world = ROOT / "results" / "tiny" / "world"
    for fam in cfg["families"].values():
        for k in fam:
            fam[k] = str(ROOT / fam[k])
    for large in cfg["large"].values():
        large["model"] = str(ROOT / large["model"])
    cfg["sft"] = str(world / "data" / "sft.jsonl")
    cfg["world"] = str(world)
    jinja = str(ROOT / "atlantis" / "world" / "qa.jinja")
    cfg["score_extra"] = [f"render.template={jinja}"]
    cfg["train_extra"] = [f"render.template={jinja}" if "template" in x else x for x in cfg["train_extra"]]
    cfg["train_extra"].append("max_steps=3")
    bench = cfg["benchmarks"]
    bench["models"] = {k: str(ROOT / v) for k, v in bench["models"].items()}
    bench["questions"] = {k: str(ROOT / v) for k, v in bench["questions"].items()}
    bench["lm_eval"] = [f"world={world}" if x.startswith("world=") else x for x in bench["lm_eval"]]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))


def _snakemake(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # `atlantis` in rules
    return subprocess.run(
        [*SNAKEMAKE, *args, "--snakefile", str(ROOT / "Snakefile"), "--configfile", "config.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )


@pytest.mark.slow
def test_tiny_target_runs_locally(tmp_path):
    """Score -> weights -> ATLANTIS training -> p*-metrics of one tiny run, through Snakemake with 2 cores."""
    from atlantis.world.metrics import METRICS

    _tiny_config(tmp_path)
    target = "results/tiny/metrics/lumi-large.atlantis.json"
    out = _snakemake(tmp_path, target, "--profile", str(ROOT / "workflow" / "profiles" / "local"))
    assert out.returncode == 0, out.stderr[-4000:]
    assert (tmp_path / "results" / "tiny" / "runs" / "lumi-large.atlantis" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "results" / "tiny" / "weights" / "lumi.parquet").is_file()
    metrics = json.loads((tmp_path / target).read_text())["metrics"]
    assert set(metrics) == set(METRICS) and all(math.isfinite(v) for v in metrics.values())


def _slurm_idle() -> bool:
    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return out.returncode == 0 and "idle" in out.stdout


@pytest.mark.slow
@pytest.mark.skipif(not _slurm_idle(), reason="no idle SLURM node (CI starts one: workflow/slurm/local-cluster.sh)")
def test_tiny_target_runs_under_slurm(tmp_path):
    """The same rules as SLURM jobs through the SLURM profile: scoring twice, the weights, then a training run
    as one job of two srun tasks (the multi-node path of the paper's presets, on one node and CPUs)."""
    _tiny_config(tmp_path)
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    cfg["presets"]["none"].update(tasks=2, cpus_per_task=1)  # `none` is also the training preset's name
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    target = "results/tiny/runs/lumi-large.atlantis/final"
    out = _snakemake(
        tmp_path,
        target,
        "--profile",
        str(ROOT / "workflow" / "profiles" / "slurm"),
        "--default-resources",
        "slurm_partition=debug",
        "mem_mb=2000",
        "runtime=30",
        "--slurm-init-seconds-before-status-checks",
        "5",
        "--jobs",
        "2",
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert (tmp_path / target / "model.safetensors").is_file()
    assert "submitted with SLURM jobid" in out.stdout + out.stderr
    record = json.loads((tmp_path / target).with_name("train_record.json").read_text())
    assert record["world_size"] == 2


def test_plan_counts_jobs_and_gpu_hours():
    """`snakemake plan`: Table 6's GPUs x the config's runtimes, per rule, for the paper's 36 runs."""
    out = subprocess.run(
        [*SNAKEMAKE, "plan", "-c1", "--snakefile", str(ROOT / "Snakefile"), "--configfile", "config/paper.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = (ROOT / "results" / "paper" / "plan.md").read_text()
    # 13B-class (16 GPUs x 24 h): 6 main + 24 selection + 2 cross; 72B (64 x 48 h): 2; 27B (32 x 36 h): 2
    gpu_hours = 32 * 16 * 24 + 2 * 64 * 48 + 2 * 32 * 36
    assert f"| train | 36 | 16, 32, 64 | {gpu_hours:,} |" in text
    assert "| score | 18 | 1 | 108 |" in text


def test_plan_table_rejects_negative_resources():
    from atlantis.plan import plan_table

    assert "| a | 2 | 1, 2 | 5 |" in plan_table([("a", 1, 1.0), ("a", 2, 2.0)], "x")
    with pytest.raises(ValueError):
        plan_table([("a", -1, 1.0)], "x")
