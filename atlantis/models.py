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


def finalize_logits(config, logits: torch.Tensor) -> torch.Tensor:
    """Logit post-processing some architectures apply after the LM head (kept identical to their forward)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(cfg, "logit_scale", None):  # Cohere
        logits = logits * cfg.logit_scale
    if getattr(cfg, "logits_scaling", None):  # Granite
        logits = logits / cfg.logits_scaling
    if getattr(cfg, "final_logit_softcapping", None):  # Gemma-2/3
        cap = cfg.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits


def max_positions(spec: str, trust_remote_code: bool = False) -> int | None:
    """The longest sequence the model takes (GPT-2: 1024), from its config; None when it does not say."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
