"""Provenance records: where a number came from (config hash, git commit, package versions, seed).

Every metrics file and every rendered table carries one, so a reviewer can trace a table cell back to the
run, the settings and the code that produced it (issue 5: "every rendered number is traceable").
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

# The packages whose versions can change a number; absent ones are recorded as None (not installed).
PACKAGES = (
    "atlantis-repro",
    "torch",
    "transformers",
    "accelerate",
    "deepspeed",
    "peft",
    "numpy",
    "pandas",
    "lm_eval",
    "fschat",
    "alpaca-eval",
    "snakemake",
    "matplotlib",
)


def config_hash(config: Any) -> str:
    """SHA-256 of a config's canonical JSON (key order and whitespace do not matter)."""
    canon = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_commit(repo: str | Path = ".") -> dict[str, Any]:
    """The checked-out commit and whether tracked files differ from it; None outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    return {"commit": head, "dirty": bool(dirty)}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment() -> dict[str, Any]:
    """What ran: code version, packages, interpreter, machine, and when."""
    return {
        "git": git_commit(Path(__file__).resolve().parent.parent),
        "versions": versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def of_model(model_dir: str | Path) -> dict[str, Any]:
    """Provenance of a model being evaluated: for a fine-tuned run (`<run>/final`), the seed and the hash of
    the training config from the run's `train_record.json`; always the environment of this evaluation."""
    record: dict[str, Any] = {"model": str(model_dir)}
    train_record = Path(model_dir).parent / "train_record.json"
    if train_record.is_file():
        cfg = json.loads(train_record.read_text())["config"]
        record.update(seed=cfg.get("seed"), train_config_sha256=config_hash(cfg), train_config=cfg)
    record.update(environment())
    return record
