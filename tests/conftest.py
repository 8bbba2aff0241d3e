"""Shared fixtures: tiny models of two families built in-process (nothing is downloaded)."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from atlantis.testing import SAMPLES, build_tiny_model  # noqa: E402,F401


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
