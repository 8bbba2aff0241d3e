"""Shared fixtures: tiny models of two families built in-process (nothing is downloaded)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from atlantis.testing import SAMPLES, build_tiny_model  # noqa: E402,F401

# Areas a run must not skip (comma-separated in ATLANTIS_REQUIRE; .ci/run sets the ones it provides), by words of
# the skip reasons: where CI is meant to test an area, a missing piece fails the run instead of skipping it.
REQUIRED_AREAS = {
    "envs": ("fschat environment", "alpaca-eval environment"),
    "assets": ("pip install", "smoke data packages"),
    "world": ("world is not built", "no shipped world"),
    "slurm": ("SLURM",),
}


def required_area(reason: str) -> str | None:
    wanted = {a.strip() for a in os.environ.get("ATLANTIS_REQUIRE", "").split(",") if a.strip()}
    unknown = wanted - set(REQUIRED_AREAS)
    if unknown:
        raise pytest.UsageError(f"ATLANTIS_REQUIRE: unknown area(s) {sorted(unknown)}; known: {sorted(REQUIRED_AREAS)}")
    return next((a for a in sorted(wanted) if any(w in reason for w in REQUIRED_AREAS[a])), None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(report.longrepr, tuple):
        area = required_area(str(report.longrepr[2]))
        if area:
            report.outcome = "failed"
            report.longrepr = f"skipped, but ATLANTIS_REQUIRE names {area!r}: {report.longrepr[2]}"


def write_answers(path: Path, model_id: str, rows: dict) -> str:
    """FastChat-format answers {question_id: turns} of one model, as `atlantis generate` writes them."""
    path.write_text(
        "".join(
            json.dumps({"question_id": q, "model_id": model_id, "choices": [{"index": 0, "turns": turns}]}) + "\n"
            for q, turns in rows.items()
        )
    )
    return str(path)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    out = {}
    for kind in ("llama", "qwen2"):
        out[kind] = str(build_tiny_model(root / kind, kind, instruct=False, seed=1))
        out[f"{kind}-it"] = str(build_tiny_model(root / f"{kind}-it", kind, instruct=True, seed=2))
    return out


@pytest.fixture()
def data_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "data.jsonl", SAMPLES)


def free_port() -> int:
    """A free TCP port on loopback for torchrun's rendezvous (port 0 does not reach the workers)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun() -> list[str]:
    """`python -m torch.distributed.run` for 2 local processes, followed by the atlantis CLI module."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "atlantis.cli",
    ]


# AlpacaEval 2.0's length-controlled win rate: alpaca-eval 0.6.6 fits its GLM on the model's own annotations but reads
# `df_gamed.csv` (the 805 instructions' difficulties and two length-gamed baselines' annotations) from the Hub
# dataset tatsu-lab/alpaca_eval. Offline, a synthetic one in a private Hugging Face cache stands in for it.
DF_GAMED_REVISION = "0123456789abcdef0123456789abcdef01234567"


def hub_cache_with_df_gamed(root: Path, n: int = 805) -> Path:
    """A Hugging Face cache holding a synthetic df_gamed.csv in the Hub dataset's layout (hf_hub_download reads it
    with HF_HUB_OFFLINE=1): two gamed baselines, concise and verbose, preferring length, with varying difficulty."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    difficulty = rng.normal(0.0, 1.0, n)
    frames = []
    for model, sign in (("gpt4_turbo_concise", -1.0), ("gpt4_turbo_verbose", 1.0)):
        delta = sign * np.abs(rng.normal(1.0, 0.5, n))
        pref = 1 / (1 + np.exp(-(0.8 * np.tanh(delta) - 0.3 * difficulty)))
        frames.append(
            pd.DataFrame(
                {
                    "model": model,
                    "index": np.arange(n),
                    "preference": pref,
                    "std_delta_len": delta,
                    "instruction_difficulty": difficulty,
                    "not_gamed_baseline": False,
                }
            )
        )
    repo = root / "datasets--tatsu-lab--alpaca_eval"
    snapshot = repo / "snapshots" / DF_GAMED_REVISION
    snapshot.mkdir(parents=True)
    pd.concat(frames, ignore_index=True).to_csv(snapshot / "df_gamed.csv", index=False)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(DF_GAMED_REVISION)
    return root


def package_lc(python: str | Path, annotations: list[dict]) -> dict:
    """The package's own get_length_controlled_winrate on an annotations DataFrame, in the alpaca-eval env."""
    code = (
        "import json, sys, pandas as pd\n"
        "from alpaca_eval import metrics\n"
        "m = metrics.get_length_controlled_winrate(pd.DataFrame(json.load(sys.stdin)), save_weights_dir=None)\n"
        "print(json.dumps({k: float(v) for k, v in m.items()}))\n"
    )
    proc = subprocess.run(
        [str(python), "-c", code], input=json.dumps(annotations), capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])
