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
        # 10 weight passes (5 families x p_S, p_r); IFD with each of the 2 larges (cond, direct); Superfiltering
        # with GPT-2, one pair shared by both larges
        "score": 16,
        "select": 12,
        "weights": 5,
    }
    # the benchmarks: lm-eval for the 36 runs and Table 7's proxy; MT-Bench per model; AlpacaEval easy
    # and hard and Arena-Hard-Auto for Table 2's 6 runs; answers for each question set; the packages' data
    assert {
        k: counts[k] for k in ("lmeval", "lmeval_proxy", "mtbench", "alpacaeval", "arena_hard", "answers", "fetch")
    } == {
        "lmeval": 36,
        "lmeval_proxy": 1,
        "mtbench": 37,  # one judging job per model: one failure blanks only its own cells
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
    assert len(scores) == 16 and len(set(scores)) == 16  # every scoring pass once
    # each role through its template: p_S plain, p_r its own; IFD and Superfiltering as released
    assert ("Qwen/Qwen2-1.5B", "render.template=plain") in scores
    assert ("Qwen/Qwen2-1.5B-Instruct", "render.template=model") in scores
    assert ("openai-community/gpt2", "render.template=superfiltering render.max_length=1024") in scores
    direct = "render.template=alpaca render.context=response_only render.direct_prefix=alpaca render.max_length=512"
    assert ("Qwen/Qwen2-7B", direct) in scores
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
    from atlantis import config as config_lib
    from atlantis.world.map import MapConfig

    for path in (ROOT / "config").glob("*.yaml"):
        if path.name == "map.yaml":  # not a workflow profile: `atlantis world map`'s settings (rule world_map)
            assert config_lib.load(MapConfig, path).families
            continue
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


def _jobs(text: str) -> list[dict]:
    """The jobs of a `snakemake -n -p` listing: rule, wildcards, resources and shell command."""
    jobs = []
    for block in re.split(r"\n(?=\[[^\]]+\]\nrule )", text):
        rule = re.search(r"^rule (\w+):", block, re.M)
        if not rule:
            continue
        res = re.search(r"^    resources: (.*)$", block, re.M)
        wild = re.search(r"^    wildcards: (.*)$", block, re.M)
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        jobs.append(
            {
                "rule": rule[1],
                "wildcards": dict(kv.split("=", 1) for kv in wild[1].split(", ")) if wild else {},
                "resources": dict(kv.split("=", 1) for kv in res[1].split(", ")) if res else {},
                "shell": shell[1] if shell else "",
            }
        )
    return jobs


@pytest.fixture(scope="module")
def paper_slurm_jobs() -> list[dict]:
    text = _dry_run("--profile", str(ROOT / "workflow" / "profiles" / "slurm"), "--configfile", "config/paper.yaml")
    return _jobs(text)


def test_paper_training_jobs_are_table6_deepspeed_runs_sized_from_the_models(paper_slurm_jobs):
    """Every paper training job: ZeRO-3 offload, srun with --cpus-per-task, --mem at least DeepSpeed's own estimate
    of the offloaded model states per node, and a time limit at least the 6·N·tokens FLOPs at 100% of peak."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    from atlantis.resources import model_size

    cfg = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    trains = [j for j in paper_slurm_jobs if j["rule"] == "train"]
    assert len(trains) == 36
    for job in trains:
        run = job["wildcards"]["run"]
        large = cfg["large"][run.split(".")[0]]
        gpus = cfg["presets"][large["preset"]]["gpus"]
        res = job["resources"]
        nodes = gpus // cfg["cluster"]["gpus_per_node"]
        assert (int(res["gpu"]), int(res["nodes"]), int(res["tasks"])) == (gpus, nodes, gpus), run
        assert int(res["cpus_per_task"]) == cfg["cluster"]["cpus_per_node"] // cfg["cluster"]["gpus_per_node"]
        assert "deepspeed=zero3_offload" in job["shell"], run
        assert f"srun --kill-on-bad-exit=1 --nodes={nodes} --ntasks={gpus} --cpus-per-task=" in job["shell"], run
        size = model_size(large["model"], cfg["model_sizes"])
        host, _, _ = estimate_zero3_model_states_mem_needs(size.params, size.largest_layer, 8, nodes)
        assert int(res["mem_mb"]) * 2**20 > host, run  # DeepSpeed's own estimate, plus the ranks' overhead
        assert int(res["mem_mb"]) <= cfg["cluster"]["ram_per_node_gb"] * 1024
        m = re.search(r"max_steps=(\d+)", job["shell"])
        steps = int(m[1])
        preset = {"paper-13b": (2, 8), "paper-27b": (1, 8), "paper-72b": (1, 4)}[large["preset"]]
        samples = steps * gpus * preset[0] * preset[1]
        ideal_h = 6 * size.params * samples * cfg["estimates"]["sft"]["tokens_per_sample"] / (gpus * 312e12) / 3600
        assert int(res["runtime"]) / 60 > ideal_h, run
    # Table 6 under the micro-batch reading: 60K/30K/15K micro-steps = 7,500/3,750/3,750 optimizer steps
    shell = {j["wildcards"]["run"]: j["shell"] for j in trains}
    assert "max_steps=7500 warmup_steps=750" in shell["llama2-13b.sft"]
    assert "max_steps=3750 warmup_steps=375" in shell["gemma2-27b.atlantis"]
    assert "max_steps=3750 warmup_steps=375" in shell["qwen2-72b.sft"]
    # Table 3's subsets: as many epochs as the full run (5% of the steps)
    assert "max_steps=375 warmup_steps=38" in shell["qwen2-7b.sft.ifd-0.05"]


def test_paper_evaluation_jobs_ask_for_the_gpus_their_model_needs(paper_slurm_jobs):
    """Qwen2-72B in bf16 (~145 GB) does not fit one 80 GB GPU: its answers and lm-eval jobs shard it over a node;
    Gemma2-27B's lm-eval needs a second GPU for its fp32 logits at a 256k vocabulary (batch 8 x 2,048 positions)."""
    for job in paper_slurm_jobs:
        model = job["wildcards"].get("model", "")
        if job["rule"] in ("answers", "lmeval"):
            want = 4 if model.startswith("qwen2-72b.") else 1
            if job["rule"] == "lmeval" and model.startswith("gemma2-27b."):
                want = 2
            assert int(job["resources"]["gpu"]) == want, (job["rule"], model)
            assert int(job["resources"]["mem_mb"]) > 0 and int(job["resources"]["runtime"]) > 0
    judged = [j for j in paper_slurm_jobs if j["rule"] in ("mtbench", "alpacaeval", "arena_hard", "judge_check")]
    assert judged and all("gpu" not in j["resources"] for j in judged)  # local rules: the API, not a GPU


def test_plan_reports_gpu_hours_and_judge_cost(tmp_path):
    """`snakemake plan`: GPU-hours of training, scoring and evaluation from FLOPs, and the judge's calls and cost."""
    out = subprocess.run(
        [*SNAKEMAKE, "plan", "-c1", "--forcerun", "plan", "--snakefile", str(ROOT / "Snakefile")]
        + ["--configfile", str(ROOT / "config" / "paper.yaml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = (tmp_path / "results" / "paper" / "plan.md").read_text()
    rows = {m[1]: m.groups()[1:] for m in re.finditer(r"^\| (\w+) \| (\d+) \| ([\d, ]+) \| ([\d,.]+) \|", text, re.M)}
    assert rows["train"][:2] == ("36", "16, 32, 64") and rows["score"][:2] == ("16", "8")
    assert rows["lmeval"][:2] == ("36", "1, 2, 4") and rows["answers"][0] == "49"
    # 13B-class training is bound by ZeRO-3's traffic, not FLOPs: 60K micro-batch passes per GPU, each gathering the
    # bf16 parameters twice and reduce-scattering the gradients (3 x 2 bytes x N x 15/16) at 20 GB/s across 2 nodes
    llama_comm = 60_000 * 6 * 13.016e9 * 15 / 16 / 20e9 / 3600
    llama_flops = 6 * 13.016e9 * 7500 * 256 * 400 / (16 * 312e12 * 0.2) / 3600
    assert llama_comm > llama_flops
    assert f"llama2-13b (13.02B): zero3_offload {llama_comm:,.0f} h" in text
    assert re.search(r"\| mtbench_pairwise \| gpt-4 \| 37 \| 11,840 \|", text)  # 80 questions x 2 turns x 2 orders
    assert "Wall-clock on 8 nodes" in text and "| **total** |" in text


def test_sbatch_submissions_carry_the_resources_and_never_the_judge_key(tmp_path):
    """With a stand-in `sbatch` on PATH (it records its arguments and environment, prints a job id), the SLURM
    executor's real submissions of every training and scoring job: --mem, -t, --cpus-per-task, GPUs, and no key."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "sbatch.log"
    (bin_dir / "sbatch").write_text(
        f'#!/bin/bash\necho "$@ KEY=${{OPENAI_API_KEY:+present}}" >> {record}\necho $((RANDOM + 1000))\n'
    )
    for f in ("squeue", "sacct", "sinfo", "scontrol", "sshare"):  # status queries: nothing to report
        (bin_dir / f).write_text("#!/bin/bash\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    work = tmp_path / "work"
    for rel in [f"weights/{f}.parquet" for f in ("llama2", "qwen2", "gemma2", "qwen2-7b", "gemma2-9b")]:
        (work / "results" / "paper" / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / "results" / "paper" / rel).write_text("")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "OPENAI_API_KEY": "sk-test-never-exported",
    }
    proc = subprocess.Popen(
        [*SNAKEMAKE, "--profile", str(ROOT / "workflow" / "profiles" / "slurm"), "--snakefile", str(ROOT / "Snakefile")]
        + ["--configfile", str(ROOT / "config" / "paper.yaml"), "--jobs", "100"]
        + ["results/paper/runs/llama2-13b.atlantis/final", "results/paper/runs/qwen2-72b.sft/final"]
        + ["results/paper/scores/qwen2-7b.small/weights.parquet", "--allowed-rules", "train", "score"],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for _ in range(240):
            if record.is_file() and len(record.read_text().splitlines()) >= 3:
                break
            if proc.poll() is not None:
                pytest.fail(proc.stdout.read()[-3000:])
            import time

            time.sleep(0.5)
    finally:
        proc.kill()
        proc.wait()
    calls = record.read_text().splitlines()
    assert len(calls) == 3
    assert all("KEY=present" not in c for c in calls)  # the key stays in the submitting process
    train72 = next(c for c in calls if "qwen2-72b.sft" in c or "--nodes=8" in c)
    assert "--nodes=8" in train72 and "--gpus=64" in train72 and "--ntasks-per-gpu=1" in train72
    assert re.search(r"--mem \d{6}", train72) and re.search(r"-t \d+", train72)
    assert "--cpus-per-task=8" in train72


def test_planned_jobs_reject_negative_resources():
    from atlantis.plan import PlannedJob

    with pytest.raises(ValueError):
        PlannedJob("a", -1, 1, 1.0, 60)
