"""Load a causal LM and its tokenizer from a local folder or a Hub id, refusing remote code by default."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from atlantis.log import get_logger

log = get_logger(__name__)


class ModelError(ValueError):
    """A model cannot be loaded as asked (missing path, no tokenizer, remote code not allowed)."""


def _looks_like_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec).exists()


def check_model_source(spec: str, trust_remote_code: bool = False) -> None:
    """Fail early, with a clear message, before any expensive loading."""
    path = Path(spec).expanduser()
    if not path.exists():
        if _looks_like_hub_id(spec):
            return  # resolved (or refused, when offline) by transformers itself
        raise ModelError(f"model {spec!r}: no such folder, and not a Hub id of the form owner/name")
    if not (path / "config.json").is_file():
        raise ModelError(f"model {spec!r}: folder has no config.json")
    config = json.loads((path / "config.json").read_text())
    if "auto_map" in config and not trust_remote_code:
        raise ModelError(
            f"model {spec!r} needs custom code from its folder (config.json has auto_map); refusing to run "
            "it. Pass trust_remote_code=true only if you trust that code."
        )
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((path / f).is_file() for f in tokenizer_files):
        raise ModelError(f"model {spec!r}: no tokenizer files ({', '.join(tokenizer_files)}) in the folder")


def pick_device(device: str = "auto") -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are ~70x slower there), bfloat16 on GPU, unless told otherwise."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_model_source(spec, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"model {spec!r}: cannot load its tokenizer: {err}") from err
    return tok


def load_model(spec: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    check_model_source(spec, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"model {spec!r}: cannot load it: {err}") from err
    model.to(device).eval()
    model.config.use_cache = False
    return model
