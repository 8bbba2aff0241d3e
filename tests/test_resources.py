"""Job sizing from the models (atlantis.resources): parameter counts, DeepSpeed memory, FLOPs and traffic, GPUs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from atlantis.resources import (
    GB,
    Cluster,
    ModelSize,
    ResourceError,
    inference_gpus,
    inference_resources,
    model_size,
    train_resources,
    zero3_model_states,
)

ROOT = Path(__file__).parents[1]
PAPER = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())


@pytest.fixture(autouse=True)
def _size_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLANTIS_SIZE_CACHE", str(tmp_path / "sizes.json"))


@pytest.mark.parametrize(
    "model, billions",
    [
        ("meta-llama/Llama-2-7b-hf", 6.738),
        ("meta-llama/Llama-2-13b-hf", 13.016),
        ("Qwen/Qwen2-1.5B", 1.544),
        ("Qwen/Qwen2-7B", 7.616),
        ("Qwen/Qwen2-72B", 72.706),
        ("google/gemma-2-2b", 2.614),
        ("google/gemma-2-9b", 9.242),
        ("google/gemma-2-27b", 27.227),
    ],
)
def test_declared_architectures_give_the_published_parameter_counts(model, billions):
    """The config's architectures, built on the meta device, have the models' published sizes."""
    size = model_size(model, PAPER["model_sizes"])
    assert size.params / 1e9 == pytest.approx(billions, abs=0.002)
    assert size.largest_layer == size.vocab * size.hidden  # the embedding (or LM head) is the largest tensor


def test_a_local_checkpoint_is_counted_from_its_config(models):
    import torch
    from transformers import AutoModelForCausalLM

    size = model_size(models["llama"], {})
    model = AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32)
    assert size.params == sum(p.numel() for p in model.parameters())
    with pytest.raises(ResourceError, match="model_sizes"):
        model_size("org/unknown-model", {})


@pytest.mark.parametrize("offload", [True, False])
@pytest.mark.parametrize("nodes, per_node", [(1, 8), (2, 8), (8, 8)])
def test_zero3_memory_is_deepspeeds_own_estimate(offload, nodes, per_node):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    ours = zero3_model_states(13_016_000_000, 163_840_000, per_node, nodes, offload, offload)
    theirs = estimate_zero3_model_states_mem_needs(13_016_000_000, 163_840_000, per_node, nodes, offload, offload)
    assert ours == tuple(int(x) for x in theirs)


SIZE_13B = ModelSize(params=13_016_000_000, largest_layer=163_840_000, layers=40, hidden=5120, vocab=32000)
A800 = Cluster()


def test_training_is_sized_for_offload_and_bound_by_zero3_traffic():
    res = train_resources(SIZE_13B, 16, tokens=7.68e8, cluster=A800, micro_batch_tokens=4096, micro_steps=60_000)
    assert (res.gpus, res.nodes, res.tasks, res.cpus_per_task) == (16, 2, 16, 8)
    host, _, _ = zero3_model_states(SIZE_13B.params, SIZE_13B.largest_layer, 8, 2)
    assert res.mem_mb * 2**20 >= host + 8 * A800.host_gb_per_rank * GB - 2**20
    flops_h = 6 * SIZE_13B.params * 7.68e8 / (16 * 312e12 * 0.2) / 3600
    comm_h = 60_000 * 6 * SIZE_13B.params * 15 / 16 / 20e9 / 3600
    assert res.hours == pytest.approx(max(flops_h, comm_h)) and comm_h > flops_h
    assert res.runtime_minutes(A800) == math.ceil(res.hours * 60 * 1.5)
    assert res.runtime_minutes(A800, attempt=2) == math.ceil(res.hours * 60 * 1.5 * 2)
    # plain DDP (16 bytes per parameter on every GPU) does not fit an 80 GB GPU: refused at planning
    with pytest.raises(ResourceError, match="per GPU"):
        train_resources(SIZE_13B, 16, tokens=1e6, cluster=A800, zero="none")
    with pytest.raises(ResourceError, match="partition"):
        train_resources(SIZE_13B, 16, 7.68e8, Cluster(max_hours=24), micro_steps=60_000)


def test_evaluation_gpus_follow_the_model_and_its_logits():
    qwen72 = model_size("Qwen/Qwen2-72B", PAPER["model_sizes"])
    gemma27 = model_size("google/gemma-2-27b", PAPER["model_sizes"])
    assert inference_gpus([qwen72], A800) == 4  # ~145 GB of bf16 weights
    assert inference_gpus([SIZE_13B], A800) == 1
    assert inference_gpus([gemma27], A800) == 1
    assert inference_gpus([gemma27], A800, logits_tokens=8 * 2048) == 2  # + fp32 logits at a 256k vocabulary
    res = inference_resources([SIZE_13B], A800, forward_tokens=1e9)
    assert res.hours == pytest.approx(2 * SIZE_13B.params * 1e9 / (312e12 * 0.4) / 3600)
    with pytest.raises(ResourceError, match="do not fit"):
        inference_gpus([qwen72] * 3, Cluster(gpus_per_node=4))
    assert inference_gpus([SIZE_13B], Cluster(gpus_per_node=0, gpu_mem_gb=0)) == 0  # a CPU cluster


def test_cpu_cluster_jobs_ask_for_their_threads_so_two_share_a_node():
    """On a CPU cluster an inference job asks for the rule's threads, not the whole node (the smoke run under the
    one-node SLURM runs two 1-thread jobs side by side); without threads it takes the node."""
    cpu = Cluster(gpus_per_node=0, gpu_mem_gb=0, cpus_per_node=2, ram_per_node_gb=16)
    small = ModelSize(params=135_000_000, largest_layer=28_000_000, layers=30, hidden=576, vocab=49152)
    assert inference_resources([small], cpu, threads=1).cpus_per_task == 1
    assert inference_resources([small], cpu).cpus_per_task == 2
    assert inference_resources([small], cpu, threads=8).cpus_per_task == 2  # never more than the node has


def test_cluster_rejects_unknown_or_negative_settings():
    with pytest.raises(ResourceError, match="unknown"):
        Cluster.from_config({"gpu_memory": 80})
    with pytest.raises(ResourceError):
        Cluster(mfu_train=-0.1)


def test_the_judge_key_reaches_the_judge_rules_of_a_local_run(tmp_path):
    """`snakemake -c1` (local executor): the judge check is a `run:` job in a fresh process; the key must reach it
    (under SLURM it is removed before any sbatch: tests/test_workflow.py records the real submissions)."""
    from atlantis.evals.local_judge import SmokeJudge, serve_grader

    with serve_grader(SmokeJudge(), api_key="sk-only-for-judges") as url:
        override = tmp_path / "judge.yaml"
        override.write_text(
            yaml.safe_dump({"benchmarks": {"judge": {"base_url": url, "api_key_env": "TEST_JUDGE_KEY"}}})
        )
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "TEST_JUDGE_KEY": "sk-only-for-judges",
        }
        out = subprocess.run(
            [sys.executable, "-m", "snakemake", "results/paper/logs/judges.checked", "-c1"]
            + [
                "--snakefile",
                str(ROOT / "Snakefile"),
                "--configfile",
                str(ROOT / "config" / "paper.yaml"),
                str(override),
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    log_file = tmp_path / "results" / "paper" / "logs" / "judge_check.log"
    log = log_file.read_text() if log_file.is_file() else ""
    assert out.returncode == 0, out.stderr[-3000:] + log[-2000:]
    assert "sk-only-for-judges" not in log + out.stdout + out.stderr  # the key is never printed
