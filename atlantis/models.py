"""Load a causal LM and its tokenizer from a local folder or a Hub id, refusing remote code by default.

Also what decoding needs to know about a model besides its weights: the tokens that end an assistant turn under
its chat template (`end_of_turn`, `eos_token_ids`), and how to place a model too large for one GPU across the
visible GPUs (`weight_bytes`, `choose_device_map`, `gpu_max_memory`).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError

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


def load_model(
    spec: str,
    dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool = False,
    device_map: str | None = None,
    max_memory: Mapping[int | str, int] | None = None,
):
    """The model in eval mode, on `device`, or sharded across the visible GPUs with `device_map="auto"`.

    Sharded loading goes through accelerate's device map: each weight is read from the checkpoint straight onto
    its device (transformers builds the model on the meta device first), so no full copy is ever held in CPU
    RAM. `max_memory` caps what each GPU receives ({gpu index: bytes}, see `gpu_max_memory`); a model that
    does not fit the GPUs is an error, not a silent offload to CPU or disk.
    """
    from transformers import AutoModelForCausalLM

    check_model_source(spec, trust_remote_code)
    kwargs: dict[str, Any] = {}
    if device_map is not None:
        if device_map != "auto":
            raise ModelError(f"device_map must be 'auto' or None, got {device_map!r}")
        kwargs = {"device_map": "auto", "max_memory": dict(max_memory) if max_memory else None}
    elif device.type != "cpu":
        kwargs = {"device_map": {"": str(device)}}  # straight onto the GPU, not through a CPU copy
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(f"model {spec!r}: cannot load it: {err}") from err
    if device_map is None:
        model.to(device)
    else:
        # transformers sets no hf_device_map when everything landed on one device
        placed = getattr(model, "hf_device_map", None) or {"": str(model.device)}
        spilled = sorted({str(d) for d in placed.values() if str(d) in ("cpu", "disk")})
        if spilled and torch.cuda.is_available():
            raise ModelError(
                f"model {spec!r} does not fit the memory of the {torch.cuda.device_count()} visible GPU(s) "
                f"(max_memory {max_memory}); parts would go to {spilled}. Ask for more GPUs."
            )
        log.info("model %s sharded over %s", spec, sorted({str(d) for d in placed.values()}))
    model.eval()
    model.config.use_cache = False
    return model


# --------------------------------------------------------------------------------------- sharding


_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}


def weight_bytes(spec: str, dtype: torch.dtype) -> int | None:
    """Bytes the model's weights take once loaded in `dtype`, from the safetensors headers (no weight is read).

    Floating-point tensors count at `dtype`'s size (a bf16 checkpoint loaded in float32 takes twice its file
    size), others at their stored size. None when the folder has no .safetensors file (a Hub id, .bin files).
    """
    files = sorted(Path(spec).glob("*.safetensors")) if Path(spec).is_dir() else []
    if not files:
        return None
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for path in files:
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for d in info["shape"]:
                numel *= d
            stored = info["dtype"]
            total += numel * (size if stored in ("F64", "F32", "F16", "BF16") else _SAFETENSORS_BYTES.get(stored, 1))
    return total


def choose_device_map(
    setting: str | None, n_gpus: int, gpu_bytes: int | None = None, model_bytes: int | None = None
) -> str | None:
    """`"auto"` (shard across the visible GPUs) or None (one device), and an error when neither can work.

    setting: "auto", "none", or None for the default: shard when more than one GPU is visible (a job is given
    several GPUs because its model needs them). `gpu_bytes`: usable memory of one GPU; `model_bytes`: the
    weights' size (`weight_bytes`). A model larger than one GPU on a single device is refused before loading.
    """
    if setting not in (None, "auto", "none"):
        raise ModelError(f"device_map must be auto, none or unset, got {setting!r}")
    choice = ("auto" if n_gpus > 1 else None) if setting is None else (None if setting == "none" else "auto")
    too_big = n_gpus >= 1 and gpu_bytes is not None and model_bytes is not None and model_bytes > gpu_bytes
    if choice is None and too_big:
        raise ModelError(
            f"the model's weights ({model_bytes / 2**30:.1f} GiB) exceed one GPU's usable memory "
            f"({gpu_bytes / 2**30:.1f} GiB) and {n_gpus} GPU(s) are visible: run on more GPUs with "
            "device_map=auto"
        )
    return choice


def gpu_max_memory(fraction: float) -> dict[int, int]:
    """{gpu index: bytes} for accelerate: `fraction` of each visible GPU's total memory (the rest stays free for
    activations and the KV cache, which the device map does not count)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"GPU memory fraction must be in (0, 1], got {fraction}")
    return {
        i: int(torch.cuda.get_device_properties(i).total_memory * fraction) for i in range(torch.cuda.device_count())
    }


# ---------------------------------------------------------------------------------------- stop tokens


@dataclass(frozen=True)
class EndOfTurn:
    """What a chat template writes right after an assistant turn's content, up to the next turn.

    `text` is that marker without surrounding whitespace (`<|im_end|>`, `<end_of_turn>`, `</s>`, "" for none);
    `token_ids` is the special token it starts with, which ends generation. A marker that is plain text
    (no special token) is returned as `stop_string` instead, matched against the decoded text.
    """

    text: str
    token_ids: tuple[int, ...]

    @property
    def stop_string(self) -> str | None:
        return self.text if self.text and not self.token_ids else None


_MARK = "\u27e6ATLANTIS-ANSWER\u27e7"


def _special_tokens(tokenizer) -> list[str]:
    """Every special token string, added ones included (ChatML's markers are added tokens, not 'special')."""
    found = {t for t in getattr(tokenizer, "all_special_tokens", []) if t}
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False) and tok.content:
            found.add(tok.content)
    return sorted(found, key=len, reverse=True)  # longest first: `<|im_end|>` before a shorter prefix


def end_of_turn(tokenizer, template: str) -> EndOfTurn:
    """The end-of-turn marker of `template` as rendered for `tokenizer` (see `EndOfTurn`).

    A conversation whose assistant turn is a unique placeholder is rendered twice, once ending with that turn and
    once followed by another user turn; what both put right after the placeholder is the end of the assistant
    turn (the second rendering cuts off an end-of-conversation suffix, the first the next turn's header).
    """
    tails = []
    for msgs in (
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARK}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARK}, {"role": "user", "content": "Go"}],
    ):
        try:
            text = tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False)
        except TemplateError:  # e.g. a template that insists on ending with a user turn
            continue
        if text.count(_MARK) == 1:
            tails.append(text[text.index(_MARK) + len(_MARK) :])
    if not tails:
        raise ModelError("the chat template cannot render a user/assistant exchange: no end-of-turn marker found")
    marker = os.path.commonprefix(tails).strip()
    for special in _special_tokens(tokenizer):
        if marker.startswith(special):
            return EndOfTurn(marker, (int(tokenizer.convert_tokens_to_ids(special)),))
    return EndOfTurn(marker, ())


def eos_token_ids(tokenizer, generation_config=None) -> set[int]:
    """The tokenizer's EOS and the generation config's (an int or a list, e.g. Qwen2-Instruct's two)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(generation_config, "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else list(eos or []))
    return ids


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
