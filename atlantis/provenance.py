"""Provenance records: where a number came from (config hash, git commit, package versions, seed).

Every metrics file and every rendered table carries one, so a reviewer can trace a table cell back to the
run, the settings and the code that produced it (issue 5: "every rendered number is traceable").
"""

from __future__ import annotations

import hashlib
import json
import os
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


# (resolved path, size, mtime_ns) -> sha256: a process that checks the same model twice (score's resume check,
# then its report) reads its gigabytes once; a file replaced in place changes size or mtime and is read again.
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def cached_file_sha256(path: str | Path) -> str:
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = file_sha256(path)
    return _SHA_CACHE[key]


# The files whose content decides a model's log-probabilities: weights in every format transformers loads, the
# shard index, the config and the tokenizer. README, generation_config.json, training logs and the like do not.
MODEL_FILE_PATTERNS = (
    "*.safetensors",
    "*.bin",
    "*.gguf",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "*.index.json",
    "config.json",
    "tokenizer*",
    "vocab.*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.*",
    "*.model",
    "*.tiktoken",
)


def model_content(spec: str | Path) -> dict[str, Any]:
    """What identifies a model's content: {file name: sha256} of its weight, config and tokenizer files for a
    folder; for a Hub id, the commit of the snapshot in the local Hugging Face cache (its files are
    content-addressed there), or the bare id with a note when no snapshot is cached (then a model replaced under
    the same id cannot be told apart)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        names = sorted({f.name for pattern in MODEL_FILE_PATTERNS for f in path.glob(pattern) if f.is_file()})
        return {"files": {name: cached_file_sha256(path / name) for name in names}}
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(str(spec), "config.json")
    if isinstance(cached, str):  # <cache>/models--owner--name/snapshots/<commit>/config.json
        return {"hub": str(spec), "revision": os.path.basename(os.path.dirname(cached))}
    return {"hub": str(spec), "note": "no snapshot in the local Hugging Face cache: identified by its id only"}


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
