"""Weighted SFT (ATLANTIS, Algorithm 1 lines 3-8) and plain SFT on the HF Trainer, under DeepSpeed or not.

Why the transformers `Trainer` and not TRL's `SFTTrainer`: the per-sample weight must travel from a weights
file, joined by sample id, into the loss. SFTTrainer keeps only its signature columns and its collator
returns only input_ids/attention_mask/labels, so a weight column is silently dropped and training runs
unweighted (see the environment notes); packing drops it too. We own the dataset (rendered by
`atlantis.render`, the same code that scores), the collator (it carries `weights`) and `compute_loss`;
the Trainer supplies everything else: DeepSpeed ZeRO-2/3 with offload (Table 6), torchrun/accelerate
launch, gradient accumulation, `num_items_in_batch` counted over accumulation steps and ranks,
checkpoints and resume.

Loss (see `atlantis.loss`): Σ_i w_i Σ_t ℓ_it / N with N the response tokens of the global batch, so that
all-ones weights are exactly plain SFT; the LM head runs only on response positions, in chunks that are
recomputed in the backward pass, so no `[batch, seq, vocab]` fp32 logits are built.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import socket
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from atlantis import config as config_lib
from atlantis.config import field
from atlantis.data import DataConfig, load_samples
from atlantis.lock import OutputLock
from atlantis.log import get_logger, rank
from atlantis.loss import IGNORE_INDEX, weighted_loss
from atlantis.models import check_model_source, finalize_logits, load_tokenizer
from atlantis.provenance import file_sha256
from atlantis.render import RenderConfig, Renderer
from atlantis.selection import read_subset
from atlantis.weights import diagnostics_path, excluded_ids, renormalize, weight_bounds, weights_for

log = get_logger(__name__)

# Paper Table 6 ("Implementation details"), per size of the large model, as printed: steps and warm-up are
# Table 6's numbers, converted by `TrainConfig.table6_steps`. Warmup and decay are linear, the optimizer is
# AdamW, the seed 0, and every run uses DeepSpeed ZeRO-3 with optimizer and parameter offload.
PRESETS: dict[str, dict[str, float | int | str]] = {
    "paper-13b": {
        "max_steps": 60_000,
        "per_device_batch_size": 2,
        "learning_rate": 2e-5,
        "grad_accum": 8,
        "warmup_steps": 6_000,
        "deepspeed": "zero3_offload",
    },
    "paper-27b": {
        "max_steps": 30_000,
        "per_device_batch_size": 1,
        "learning_rate": 5e-6,
        "grad_accum": 8,
        "warmup_steps": 3_000,
        "deepspeed": "zero3_offload",
    },
    "paper-72b": {
        "max_steps": 15_000,
        "per_device_batch_size": 1,
        "learning_rate": 5e-7,
        "grad_accum": 4,
        "warmup_steps": 1_500,
        "deepspeed": "zero3_offload",
    },
}
# The values of the preset-filled settings when neither they nor a preset are given.
UNPRESET_DEFAULTS: dict[str, float | int | str] = {
    "max_steps": -1,
    "per_device_batch_size": 2,
    "learning_rate": 2e-5,
    "grad_accum": 8,
    "warmup_steps": 0,
    "deepspeed": "none",
}
TABLE6_STEP_SETTINGS = ("max_steps", "warmup_steps")  # Table 6's step counts, read per `table6_steps`
DEEPSPEED_CONFIGS = Path(__file__).resolve().parent / "deepspeed"
# fp32 logits per LM-head chunk in the loss. Larger than the scorer's budget: every chunk is recomputed in the
# backward pass (and, under ZeRO-3, gathers the head), so fewer, larger chunks are faster.
LOSS_LOGITS_BUDGET = 1024 * 2**20


VERIFY_TOKENS = 256  # tokens of one row checked against the model's own loss at the first step


class TrainError(ValueError):
    """Training cannot start as configured."""


@dataclass
class LoraConfig:
    enabled: bool = field(False, help="Train LoRA adapters (peft) instead of all weights.")
    r: int = field(16, help="LoRA rank.")
    alpha: int = field(32, help="LoRA alpha.")
    dropout: float = field(0.05, help="LoRA dropout.")
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], help="Modules to adapt."
    )


@dataclass
class TrainConfig:
    model: str = field(help="The large base model p_L to fine-tune (folder or Hub id).")
    data: DataConfig = field(help="The SFT set D.")
    out: str = field(help="Output folder: checkpoints, and the final model (safetensors + tokenizer).")
    method: Literal["sft", "atlantis"] = field("atlantis", help="`sft`: unweighted; `atlantis`: weighted.")
    weights: str | None = field(None, help="Weights file from `atlantis weights` (required for atlantis).")
    subset: str | None = field(None, help="Train only on these ids (a selection Parquet or a text file).")
    render: RenderConfig = field(
        default_factory=lambda: RenderConfig(include_end_of_turn=True),
        help="Rendering; the end-of-turn token is trained so that the model learns to stop.",
    )
    preset: Literal["none", "paper-13b", "paper-27b", "paper-72b"] = field(
        "none",
        help="Paper Table 6 settings for the large model's size: defaults for max_steps, warmup_steps, "
        "per_device_batch_size, grad_accum, learning_rate and deepspeed (zero3_offload); settings given "
        "explicitly win.",
    )
    table6_steps: Literal["micro", "optimizer"] = field(
        "micro",
        help="How a preset's steps (Table 6: 60K/30K/15K, warm-up 10%) are read. micro: per-GPU micro-batch "
        "passes, so optimizer steps = steps / grad_accum (1.9/0.96/0.96 epochs of OpenHermes-2.5); optimizer: "
        "optimizer steps (15.4/7.7/3.8 epochs, implausible for SFT).",
    )
    normalization: Literal["token", "sequence"] = field(
        "token", help="token: Σ w·ℓ / response tokens of the global batch (= SFT at w=1); sequence: Alg. 1."
    )
    max_steps: int | None = field(
        None, help="Optimizer steps (-1: run num_train_epochs). Unset: the preset's (see table6_steps), else -1."
    )
    num_train_epochs: float = field(1.0, help="Epochs when max_steps is -1.")
    per_device_batch_size: int | None = field(None, help="Micro-batch size per process. Unset: the preset's, else 2.")
    grad_accum: int | None = field(None, help="Gradient accumulation steps. Unset: the preset's, else 8.")
    learning_rate: float | None = field(None, help="Peak learning rate (AdamW). Unset: the preset's, else 2e-5.")
    warmup_steps: int | None = field(
        None,
        help="Linear warm-up optimizer steps, then linear decay to 0. Unset: the preset's (see table6_steps), else 0.",
    )
    weight_decay: float = field(0.0, help="AdamW weight decay.")
    max_grad_norm: float = field(1.0, help="Gradient clipping (global L2 norm); 0: no clipping.")
    seed: int = field(0, help="Seed (paper: 0).")
    dtype: Literal["auto", "float32", "bfloat16"] = field(
        "auto", help="Mixed precision: auto is bf16 on GPU, fp32 on CPU (the Trainer's and DeepSpeed's bf16 flag)."
    )
    deepspeed: str | None = field(
        None,
        help="DeepSpeed JSON, or a shipped name: zero3_offload (Table 6: ZeRO-3, optimizer and parameters "
        "offloaded to CPU RAM), zero3 (no offload: faster where the GPUs hold weights, gradients and AdamW "
        "states), zero2; `none`: no DeepSpeed. Unset: the preset's (zero3_offload), else none.",
    )
    gradient_checkpointing: bool = field(False, help="Recompute activations in backward.")
    loss_chunk: int | None = field(
        None,
        help="Response positions per LM-head chunk in the loss, recomputed in backward; default: as many "
        "as fit 64 MiB of fp32 logits (64 rows at Gemma's 262k vocabulary).",
    )
    lora: LoraConfig = field(default_factory=LoraConfig, help="LoRA via peft.")
    verify: bool = field(True, help="At the first step, check the chunked loss against the model's own loss.")
    renormalize_weights: bool = field(
        True, help="Rescale the weights to mean 1 over the samples actually trained on (subsets, exclusions)."
    )
    logging_steps: int = field(10, help="Log every N steps.")
    save_steps: int = field(500, help="Checkpoint every N steps.")
    save_total_limit: int | None = field(3, help="Keep at most N checkpoints.")
    keep_checkpoints: bool = field(
        True,
        help="Keep out/checkpoint-* once the final model is written (a ZeRO-3 checkpoint holds the optimizer states: "
        "~16 bytes per parameter); false deletes them, as the smoke profile does.",
    )
    resume: str = field("auto", help="`auto`: resume from the last checkpoint in `out` if any; `none`; or a path.")
    trust_remote_code: bool = field(False, help="Allow a model folder's own Python code to run.")
    report_to: str = field("none", help="Trainer integrations (none, tensorboard, wandb, ...).")

    def __post_init__(self) -> None:
        if self.method == "atlantis" and not self.weights:
            raise ValueError("method=atlantis needs weights=FILE (from `atlantis weights`)")
        if self.method == "sft" and self.weights:
            raise ValueError("method=sft trains unweighted; drop weights= or use method=atlantis")
        self.validate(given_only=True)  # first the values given: the preset's step schedule divides by grad_accum
        self._apply_preset()
        self.validate()
        if 0 < self.max_steps <= self.warmup_steps:
            log.warning(
                "warmup_steps=%d >= max_steps=%d: the learning rate never reaches its peak",
                self.warmup_steps,
                self.max_steps,
            )

    def validate(self, given_only: bool = False) -> None:
        """Refuse, naming the setting, its value and the allowed range, any value the Trainer would take
        silently: num_train_epochs=0 trains nothing and writes the base model as the final one, a negative
        max_grad_norm turns clipping off. Called on construction and again by `train`, before any model loads
        (a dataclass can be changed after construction)."""
        for name, (ok, allowed) in SETTING_RANGES.items():
            if name.startswith("lora.") and not self.lora.enabled:
                continue
            value = getattr(self.lora, name[5:]) if name.startswith("lora.") else getattr(self, name)
            if given_only and value is None and name in UNPRESET_DEFAULTS:
                continue  # not given: the preset (or its default) fills it
            if not ok(value):
                raise TrainError(f"{name} must be {allowed}; got {value!r}")

    def _apply_preset(self) -> None:
        """Fill every preset setting left unset (None) from the preset, else from UNPRESET_DEFAULTS.

        Explicit values win: None means "not given" (YAML, key=value or Python alike), so `preset=paper-13b
        deepspeed=zero3 max_steps=10` trains 10 steps under ZeRO-3 without offload. A resolved config holds
        no None, so rebuilding it from its own record (train_record.json) gives the same run.
        """
        preset = PRESETS.get(self.preset, {})
        filled = {}
        for name, fallback in UNPRESET_DEFAULTS.items():
            if getattr(self, name) is None:
                filled[name] = preset.get(name, fallback)
                setattr(self, name, filled[name])
        if self.preset != "none":
            # the accumulation actually used, so that an explicit grad_accum keeps the samples seen
            schedule = dict(zip(TABLE6_STEP_SETTINGS, table6_schedule(self.preset, self.table6_steps, self.grad_accum)))
            for name in TABLE6_STEP_SETTINGS:
                if name in filled:
                    filled[name] = schedule[name]
                    setattr(self, name, filled[name])
        self.from_preset = {k: v for k, v in filled.items() if k in preset}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value, at_least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= at_least


# What each setting accepts, checked by `TrainConfig.validate`: a test, and the range the error names.
SETTING_RANGES = {
    "num_train_epochs": (lambda v: _finite(v) and v > 0, "a number > 0"),
    "max_steps": (lambda v: _integer(v, -1) and v != 0, "positive, or -1 to run num_train_epochs"),
    "per_device_batch_size": (lambda v: _integer(v, 1), "an integer >= 1"),
    "grad_accum": (lambda v: _integer(v, 1), "an integer >= 1"),
    "learning_rate": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "warmup_steps": (lambda v: _integer(v, 0), "an integer >= 0"),
    "weight_decay": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    # the Trainer clips only when max_grad_norm > 0: 0 is its "off", a negative value is a typo it would take as off
    "max_grad_norm": (lambda v: _finite(v) and v >= 0, "a finite number > 0, or 0 for no clipping"),
    "seed": (lambda v: _integer(v, 0) and v < 2**32, "an integer in [0, 2**32)"),  # numpy's seeds are 32-bit
    "loss_chunk": (lambda v: v is None or _integer(v, 1), "an integer >= 1, or unset"),
    "logging_steps": (lambda v: _integer(v, 1), "an integer >= 1"),
    "save_steps": (lambda v: _integer(v, 1), "an integer >= 1"),
    "save_total_limit": (lambda v: v is None or _integer(v, 1), "an integer >= 1, or null to keep every checkpoint"),
    "lora.r": (lambda v: _integer(v, 1), "an integer >= 1"),  # lora.*: checked when LoRA is enabled
    "lora.alpha": (lambda v: _finite(v) and v > 0, "a number > 0"),
    "lora.dropout": (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
}


def table6_schedule(
    preset: str, reading: Literal["micro", "optimizer"] = "micro", grad_accum: int | None = None
) -> tuple[int, int]:
    """(optimizer steps, warm-up optimizer steps) of a preset under a reading of Table 6's "training steps".

    `micro`: Table 6 counts per-GPU micro-batch passes, so the optimizer steps once per `grad_accum` of them
    (default: the preset's accumulation), rounded up. `optimizer`: the numbers are optimizer steps.
    """
    values = PRESETS[preset]
    steps, warmup = int(values["max_steps"]), int(values["warmup_steps"])
    if reading == "optimizer":
        return steps, warmup
    if reading != "micro":
        raise ValueError(f"table6_steps must be 'micro' or 'optimizer', got {reading!r}")
    accum = int(grad_accum if grad_accum is not None else values["grad_accum"])
    return -(-steps // accum), -(-warmup // accum)


# ------------------------------------------------------------------------------------------- data


class WeightedSFTDataset(torch.utils.data.Dataset):
    """Rendered samples with labels (-100 outside responses) and their weight, in a fixed id order."""

    def __init__(
        self,
        ids: list[str],
        input_ids: list[list[int]],
        labels: list[list[int]],
        weights: list[float],
        template_name: str = "model",
        template: str | None = None,
    ):
        self.ids, self.input_ids, self.labels, self.weights = ids, input_ids, labels, weights
        # The chat template the samples were rendered with (atlantis.render): the final model's tokenizer gets it.
        self.template_name, self.template = template_name, template

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i], "weights": self.weights[i]}


def build_dataset(cfg: TrainConfig, tokenizer) -> WeightedSFTDataset:
    samples = load_samples(cfg.data)
    if cfg.subset:
        wanted = read_subset(cfg.subset)
        known = {s.id for s in samples}
        missing = [i for i in wanted if i not in known]
        if missing:
            raise TrainError(f"{cfg.subset}: {len(missing)} id(s) are not in {cfg.data.path}, e.g. {missing[:3]}")
        keep = set(wanted)
        samples = [s for s in samples if s.id in keep]
    renderer = Renderer(tokenizer, cfg.render)
    rendered, excluded = renderer.render(samples)
    if excluded:
        log.warning("training without %d sample(s) whose response did not fit max_length", len(excluded))
    if cfg.method == "atlantis":
        # samples the weights step left out (p_S and p_r scored different response text) have no weight
        left_out = excluded_ids(cfg.weights)
        if any(r.id in left_out for r in rendered):
            log.warning(
                "training without %d sample(s) that have no weight (listed in the weights' diagnostics)",
                sum(r.id in left_out for r in rendered),
            )
            rendered = [r for r in rendered if r.id not in left_out]
    ids = [r.id for r in rendered]
    # every sample needs a finite weight, or weights_for raises before any training
    w = weights_for(ids, cfg.weights).tolist() if cfg.method == "atlantis" else [1.0] * len(ids)
    if cfg.method == "atlantis" and cfg.renormalize_weights:
        # The weights have mean 1 over everything scored; on a subset (Table 3) or after exclusions their mean
        # drifts, which would rescale the learning rate against the SFT baseline on the same samples. Rescaled
        # together with the weights' cap and floor (dividing by the mean would lift capped weights above the cap).
        bounds = weight_bounds(cfg.weights)
        log.info("weights over the %d training samples: mean %.4f, renormalised to 1", len(w), sum(w) / len(w))
        w = renormalize(np.asarray(w), **bounds).tolist()
    labels = [[t if m else IGNORE_INDEX for t, m in zip(r.input_ids, r.labels_mask)] for r in rendered]
    log.info(
        "training set: %d samples, %d response tokens, weights mean %.3f",
        len(ids),
        sum(r.n_response for r in rendered),
        sum(w) / max(len(w), 1),
    )
    return WeightedSFTDataset(
        ids, [r.input_ids for r in rendered], labels, w, renderer.template_name, renderer.template
    )


@dataclass
class WeightedCollator:
    """Right-pads a micro-batch and carries the per-sample weights."""

    pad_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attn = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            attn[i, :n] = 1
        # A list, not a tensor: the Trainer casts floating tensors to DeepSpeed's bf16, which would round weights.
        weights = [float(f["weights"]) for f in features]
        return {"input_ids": ids, "attention_mask": attn, "labels": labels, "weights": weights}


# ------------------------------------------------------------------------------------------- loss


def _chunk_nll(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, config) -> torch.Tensor:
    logits = finalize_logits(config, head(hidden).float())
    return F.cross_entropy(logits, targets, reduction="none")


def response_token_nll(model, input_ids, attention_mask, labels, chunk: int | None = None, core=None):
    """Per-token NLL [B, T-1] (zero off the response) and the response mask, without full logits.

    `model` may be wrapped (DDP, DeepSpeed engine): the forward goes through the wrapper, so that gradient
    synchronisation and ZeRO-3 parameter gathering work, with `logits_to_keep=1` so that the model's own LM
    head costs one position; `core` is the unwrapped model whose LM head we apply ourselves, only on positions
    that predict a response token, `chunk` rows at a time. Each chunk is checkpointed: its fp32 logits are
    freed after the forward and recomputed in the backward pass.
    """
    core = core if core is not None else model
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, output_hidden_states=True, use_cache=False
    )
    hidden = out.hidden_states[-1]  # after the final norm (checked against the full loss at the first step)
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    h = hidden[:, :-1][mask]
    targets = shift_labels[mask]
    head = core.get_output_embeddings()
    vocab = getattr(head.weight, "ds_shape", head.weight.shape)[0]  # ZeRO-3 releases the data: use its shape
    chunk = chunk or max(16, LOSS_LOGITS_BUDGET // (4 * vocab))
    parts = [
        checkpoint(_chunk_nll, h[s : s + chunk], targets[s : s + chunk], head, core.config, use_reentrant=False)
        for s in range(0, targets.shape[0], chunk)
    ]
    nll = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    if parts:
        nll = nll.masked_scatter(mask, torch.cat(parts))
    return nll, mask


def _trainer_class():
    from transformers import Trainer

    class WeightedTrainer(Trainer):
        """Trainer whose loss is `atlantis.loss.weighted_loss` with the batch's per-sample weights."""

        def __init__(
            self, *args, normalization: str = "token", loss_chunk: int | None = None, verify: bool = True, **kwargs
        ):
            super().__init__(*args, **kwargs)
            self.verified = not verify
            self.normalization = normalization
            self._staging_dir: str | None = None  # set while a checkpoint is written (see _save_checkpoint)
            self.loss_chunk = loss_chunk
            # Our compute_loss normalises by num_items_in_batch itself: tell the Trainer to count it and not
            # to divide by the accumulation steps again.
            self.model_accepts_loss_kwargs = True

        def _get_output_dir(self, trial) -> str:
            return self._staging_dir or super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial) -> None:
            """The Trainer's checkpoint, written into tmp-checkpoint-N/ and renamed to checkpoint-N once complete:
            a run killed while saving leaves no checkpoint-N that looks resumable but is not."""
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

            out = Path(self.args.output_dir)
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            staging = out / f"{STAGING}{name}"
            self._staging_dir = str(staging)
            try:
                with _saving(staging, out, name):
                    super()._save_checkpoint(model, trial)
            finally:
                self._staging_dir = None
            self.accelerator.wait_for_everyone()  # every rank's files are in (RNG states, ZeRO partitions)
            if self.args.should_save:
                _publish(staging / name, out / name)
                staging.rmdir()
                # the Trainer rotated inside the staging folder, where it saw this checkpoint only
                rotate_checkpoints(
                    str(out), self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True
                )
            self.accelerator.wait_for_everyone()

        def _run_epoch(self, *args, **kwargs):
            # Resumed from the checkpoint saved at max_steps (a run killed while writing its final model), the
            # Trainer trains one step beyond max_steps when that step falls mid-epoch: there is nothing to train.
            if 0 < self.state.max_steps <= self.state.global_step:
                self.control.should_training_stop = True
                return None
            return super()._run_epoch(*args, **kwargs)

        def _verify(self, model, inputs, labels, nll, mask):
            """Once: our chunked response NLL equals the model's own causal-LM loss, on the first row's first
            VERIFY_TOKENS tokens (a full-logits check of the whole batch would cost the memory we save)."""
            rows = [i for i in range(labels.shape[0]) if mask[i, : VERIFY_TOKENS - 1].any()]
            if not rows:
                return  # no response token early enough in this batch: check the next one
            i, n = rows[0], VERIFY_TOKENS
            with torch.no_grad():
                ref = model(
                    input_ids=inputs["input_ids"][i : i + 1, :n],
                    attention_mask=inputs["attention_mask"][i : i + 1, :n],
                    labels=labels[i : i + 1, :n],
                    use_cache=False,
                ).loss
            ours = nll[i, : n - 1].detach().sum() / mask[i, : n - 1].sum()
            tol = 1e-4 if nll.dtype == torch.float32 and not self.args.bf16 else 2e-2
            if abs(float(ours) - float(ref)) > tol * max(1.0, abs(float(ref))):
                raise TrainError(
                    f"the chunked loss ({float(ours):.6f}) differs from the model's own loss "
                    f"({float(ref):.6f}); this architecture post-processes its hidden states or "
                    "logits in a way atlantis does not replicate (verify=false skips this check)"
                )
            self.verified = True

        def _get_num_items_in_batch(self, batch_samples, device):
            if self.normalization == "token":
                return super()._get_num_items_in_batch(batch_samples, device)
            # Algorithm 1's |B|: sequences in the global batch (all accumulation steps, all ranks).
            count = torch.tensor(sum(b["labels"].shape[0] for b in batch_samples), device=device)
            if self.args.world_size > 1:
                count = self.accelerator.gather(count).sum()
            return count

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            weights = torch.as_tensor(inputs.pop("weights"), dtype=torch.float32, device=labels.device)
            core = self.accelerator.unwrap_model(model)
            nll, mask = response_token_nll(
                model, inputs["input_ids"], inputs["attention_mask"], labels, self.loss_chunk, core
            )
            if not self.verified:
                self._verify(model, inputs, labels, nll, mask)
            if num_items_in_batch is None:  # evaluation, or a caller outside the training loop
                num_items_in_batch = mask.sum() if self.normalization == "token" else labels.shape[0]
            loss = weighted_loss(nll, mask, weights, num_items_in_batch, self.normalization)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                # DDP/DeepSpeed average gradients over ranks; the global denominator already counts every
                # rank's items, so undo that average (as the Trainer's own compute_loss does).
                loss = loss * self.accelerator.num_processes
            return (loss, {"nll": nll}) if return_outputs else loss

    return WeightedTrainer


# ----------------------------------------------------------------------------------------- the run


def resolve_deepspeed(spec: str | None) -> str | None:
    """The DeepSpeed JSON path for a setting (a shipped name or a file); None for no DeepSpeed."""
    if spec is None or spec == "none":
        return None
    shipped = DEEPSPEED_CONFIGS / f"{spec}.json"
    if shipped.is_file():
        return str(shipped)
    if not Path(spec).is_file():
        raise TrainError(
            f"deepspeed config {spec!r}: no such file, and not one of "
            f"{sorted(p.stem for p in DEEPSPEED_CONFIGS.glob('*.json'))}"
        )
    return spec


def mixed_bf16(cfg: TrainConfig, on_gpu: bool | None = None) -> bool:
    """Whether the run computes in bf16: the Trainer's `bf16` flag, which also fills DeepSpeed's `"auto"`."""
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    return cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and on_gpu)


def load_dtype(cfg: TrainConfig, on_gpu: bool | None = None) -> torch.dtype:
    """The dtype the weights are loaded in.

    Under DeepSpeed with bf16 the engine holds bf16 weights and keeps the fp32 master copy inside its
    (offloaded) optimizer, built from those bf16 weights; ZeRO-3's zero.Init creates the partitions in bf16
    whatever dtype is asked. Loading fp32 would only double the bytes read and held until the engine casts
    them (ZeRO-2: a full fp32 copy per rank, 52 GB for a 13B model), for the same result. Without DeepSpeed
    the Trainer autocasts fp32 weights: those must stay fp32, because pure-bf16 AdamW rounds most updates
    away at the paper's learning rates (2e-5 to 5e-7).
    """
    if mixed_bf16(cfg, on_gpu) and resolve_deepspeed(cfg.deepspeed) is not None:
        return torch.bfloat16
    return torch.float32


def training_arguments(cfg: TrainConfig):
    from transformers import TrainingArguments

    on_gpu = torch.cuda.is_available()
    bf16 = mixed_bf16(cfg, on_gpu)
    extra = {"gradient_checkpointing": True} if cfg.gradient_checkpointing else {}
    return TrainingArguments(
        **extra,
        output_dir=cfg.out,
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.num_train_epochs,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim="adamw_torch",
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16,
        use_cpu=not on_gpu,
        deepspeed=resolve_deepspeed(cfg.deepspeed),
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        remove_unused_columns=False,  # keep `weights`: the dataset is ours, not a datasets.Dataset
        average_tokens_across_devices=True,
        report_to=cfg.report_to,
        dataloader_num_workers=0,
        ddp_backend="gloo" if not on_gpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------- run state, crash safety
#
# A checkpoint or the final model is written into a `tmp-` folder and renamed into place once complete, so
# that `checkpoint-N` and `final` are complete or absent: a run killed while saving (or a full disk) leaves only
# a `tmp-` folder, which the next start sets aside. Set aside, not deleted: it may be the only trace of what
# went wrong, and deleting hundreds of GB unasked is not ours to decide; the warning says it can go.

STAGING = "tmp-"  # prefix of a folder being written
ASIDE = "incomplete-"  # prefix of an interrupted save, set aside
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Inputs hashed into the run's fingerprint: the model folder's files that transformers reads (weights, configs,
# tokenizer, remote code), not READMEs or the `original/` copies some repositories ship.
MODEL_FILE_GLOBS = ("*.safetensors", "*.bin", "*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py")
# A short write, as each writer reports it: torch's zip writer loses the errno ("unexpected pos N vs M"),
# safetensors wraps it ("No space left on device (os error 28)").
DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122", "unexpected pos")


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: Path, value) -> None:
    """Write whole or not at all: a reader (another rank, the next run) never sees half a file."""
    tmp = path.with_name(f"{STAGING}{path.name}")
    tmp.write_text(json.dumps(value, indent=1, default=str))
    os.replace(tmp, path)


def _zip_problem(path: Path) -> str | None:
    # torch.save writes a zip whose directory is at the end: a truncated file has none
    if not path.is_file():
        return f"no {path.name}"
    return None if zipfile.is_zipfile(path) else f"{path.name} is truncated"


def _safetensors_problem(path: Path) -> str | None:
    """Whether the file holds every byte its header promises (a truncated file loads as garbage or not at all)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 8 + n <= size else {}
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=None)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        end = None
    if end is None:
        return f"{path.name} has no readable header"
    return None if 8 + n + end <= size else f"{path.name} is truncated ({size} of {8 + n + end} bytes)"


def _weights_problem(folder: Path) -> str | None:
    """Why `folder` holds no complete model weights (full, sharded or a LoRA adapter), or None."""
    for stem in ("model", "adapter_model", "pytorch_model"):
        index = _read_json(folder / f"{stem}.safetensors.index.json") or _read_json(folder / f"{stem}.bin.index.json")
        files = sorted(set(index.get("weight_map", {}).values())) if index else []
        if not index:
            files = [f"{stem}.{ext}" for ext in ("safetensors", "bin") if (folder / f"{stem}.{ext}").is_file()][:1]
        for name in files:
            path = folder / name
            if not path.is_file():
                return f"no {name} (named by the index)"
            problem = _safetensors_problem(path) if name.endswith(".safetensors") else _zip_problem(path)
            if problem:
                return problem
        if files:
            return None
    return "no model weights"


def _checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a checkpoint to resume from, or None.

    Complete: the Trainer's state (written last) parses, the weights are whole, and the training state is
    there: AdamW moments and the scheduler (optimizer.pt, scheduler.pt; under DeepSpeed the engine's
    global_stepN/*optim_states.pt named by `latest`, and there the weights too when ZeRO-3 does not gather
    them) and the RNG states. The Trainer itself resumes without an optimizer file, silently, with fresh moments.
    """
    if not (folder / "trainer_state.json").is_file():
        return "no trainer_state.json"
    if "global_step" not in (_read_json(folder / "trainer_state.json") or {}):
        return "trainer_state.json is unreadable"
    latest = folder / "latest"
    if latest.is_file():
        tag = folder / latest.read_text().strip()
        states = sorted(tag.glob("*optim_states.pt")) if tag.is_dir() else []
        if not states:
            return f"DeepSpeed checkpoint {tag.name} has no optimizer states"
        problem = next(filter(None, map(_zip_problem, states + sorted(tag.glob("*model_states.pt")))), None)
    else:
        problem = (
            _weights_problem(folder) or _zip_problem(folder / "optimizer.pt") or _zip_problem(folder / "scheduler.pt")
        )
    if problem:
        return problem
    rng = sorted(folder.glob("rng_state*.pth"))
    return next(filter(None, map(_zip_problem, rng)), None) if rng else "no rng_state.pth"


def _checkpoints(out: Path) -> tuple[list[Path], dict[Path, str]]:
    """The complete checkpoints in `out` by step, and the incomplete ones with what they lack."""
    found = sorted((int(m.group(1)), p) for p in out.glob("checkpoint-*") if (m := CHECKPOINT_RE.match(p.name)))
    complete, incomplete = [], {}
    for _, path in found:
        if path.is_dir() and (problem := _checkpoint_problem(path)) is None:
            complete.append(path)
        elif path.is_dir():
            incomplete[path] = problem
    return complete, incomplete


def _set_aside(path: Path) -> Path | None:
    """Rename an interrupted save out of the way; None if another rank got there first.

    `incomplete-checkpoint-N-<time>`, not `checkpoint-N.incomplete`: the Trainer's rotation globs checkpoint-*,
    and would count such a folder against save_total_limit and delete it (or a complete one) in its stead.
    """
    name = f"{ASIDE}{path.name.removeprefix(STAGING)}-{time.strftime('%Y%m%d-%H%M%S')}"
    aside, i = path.with_name(name), 1
    while aside.exists():
        aside, i = path.with_name(f"{name}-{i}"), i + 1
    try:
        path.rename(aside)
    except FileNotFoundError:
        return None
    return aside


def _tidy(out: Path, incomplete: dict[Path, str]) -> None:
    """Set aside what interrupted saves left in `out` (rank 0 only): `tmp-` folders and incomplete checkpoints."""
    leftovers = dict(incomplete)
    for path in sorted(out.glob(f"{STAGING}checkpoint-*")) + [out / f"{STAGING}final"]:
        if path.is_dir():
            leftovers[path] = "an interrupted save"
    moved = [f"{p.name} ({why}) -> {aside.name}" for p, why in leftovers.items() if (aside := _set_aside(p))]
    if moved:
        log.warning(
            "%s: set aside %d incomplete folder(s) that an interrupted run left (not resumable; delete them to "
            "free space): %s",
            out,
            len(moved),
            "; ".join(moved),
        )


def _free_space(folder: Path) -> str:
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    return f"{shutil.disk_usage(existing).free / 2**30:.2f} GiB free"


def _is_disk_full(err: BaseException | None) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(err).lower() for text in DISK_FULL_TEXT):
            return True
        err = err.__cause__ or err.__context__
    return False


@contextmanager
def _saving(staging: Path, out: Path, what: str):
    """Turn a full disk while writing `out/what` (into `staging`), however the writer reports it, into one line
    that says what to do."""
    try:
        yield
    except Exception as err:
        if not _is_disk_full(err):
            raise
        aside = _set_aside(staging) if staging.exists() else None
        complete, _ = _checkpoints(out)
        detail = " ".join(str(err).split())[:200]
        raise TrainError(
            f"{out / what}: the disk is full ({_free_space(out)}; {type(err).__name__}: {detail}). Free space there"
            + (f"; the partial save was set aside as {aside} (delete it to free its space)" if aside else "")
            + "; rerunning with the same settings resumes from "
            + (
                f"{complete[-1].name}, the last complete checkpoint"
                if complete
                else "the start (no complete checkpoint)"
            )
        ) from err


def _publish(staging: Path, target: Path) -> None:
    """Rename a finished `tmp-` folder into place, replacing an earlier run's folder of that name (resume=none)."""
    if target.exists():
        log.info("replacing the earlier %s", target)
        shutil.rmtree(target)
    staging.rename(target)


def _input_files(cfg: TrainConfig) -> dict[str, tuple[Path, list[Path]]]:
    """The files whose bytes make the trained model, by role: the role's folder and its files."""
    roles = {}
    model = Path(cfg.model).expanduser()
    if model.is_dir():  # a Hub id is not hashed: its revision pins its content
        files = sorted({p for g in MODEL_FILE_GLOBS for p in model.glob(g) if p.is_file()})
        if any(p.suffix == ".safetensors" for p in files):  # what transformers loads; a .bin copy would double the time
            files = [p for p in files if not p.name.startswith("pytorch_model")]
        roles["model"] = (model, files)
    data = Path(cfg.data.path).expanduser()
    if data.is_dir():  # a `datasets` save_to_disk folder; not the cache-* files `datasets` may add beside the data
        roles["data"] = (data, sorted(p for p in data.rglob("*") if p.is_file() and not p.name.startswith("cache-")))
    elif data.is_file():
        roles["data"] = (data.parent, [data])
    for role, spec in (("weights", cfg.weights), ("subset", cfg.subset)):
        if spec and Path(spec).is_file():
            files = [Path(spec)]
            if role == "weights" and diagnostics_path(Path(spec)).is_file():
                files.append(diagnostics_path(Path(spec)))  # the cap, floor and exclusions are read from it
            roles[role] = (Path(spec).parent, files)
    return roles


def _input_hashes(cfg: TrainConfig, known: dict | None = None) -> dict:
    """sha256 of every input file: {role: {"root": folder, "files": {name: {sha256, size, mtime_ns}}}}.

    Hashing reads every byte (~0.5 GB/s: a 15 GB model takes ~30 s), once per run: a rerun reuses the recorded
    hash (`known`) of a file whose size and mtime are unchanged. Replacing a file in place changes its mtime; a
    copy of another file that keeps its size and mtime to the nanosecond (cp -p) would go unnoticed.
    """
    known = known or {}
    hashes = {}
    for role, (root, files) in _input_files(cfg).items():
        root_name = str(root.resolve())
        before = known.get(role, {}).get("files", {}) if known.get(role, {}).get("root") == root_name else {}
        entries = {}
        for path in files:
            name, stat = path.relative_to(root).as_posix(), path.stat()
            old = before.get(name)
            if old and (old.get("size"), old.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns):
                entries[name] = old
                continue
            if stat.st_size > 2**30:
                log.info("hashing %s (%.1f GB) for the run's record of its inputs", path, stat.st_size / 1e9)
            entries[name] = {"sha256": file_sha256(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        hashes[role] = {"root": root_name, "files": entries}
    return hashes


def _settings_fingerprint(cfg: TrainConfig, known: dict | None = None) -> dict:
    """What must not change between a run and its resumption, as JSON reads it back: the settings (not out,
    resume, logging, saving) and, under `inputs`, the content of the model, data, weights and subset files
    (a model or data set replaced in place keeps its path). `known`: a recorded fingerprint, whose hashes
    are reused for unchanged files."""
    skip = {"out", "resume", "logging_steps", "save_steps", "save_total_limit", "keep_checkpoints", "report_to"}
    skip.add("verify")
    settings = {k: v for k, v in config_lib.to_dict(cfg).items() if k not in skip}
    settings = json.loads(json.dumps(settings, default=str))
    settings["inputs"] = _input_hashes(cfg, (known or {}).get("inputs"))
    return settings


def _changes(old: dict, new: dict) -> list[str]:
    """The settings, and the input files, that differ between two fingerprints."""
    changed = sorted(k for k in set(old) | set(new) if k != "inputs" and old.get(k) != new.get(k))
    if "inputs" not in old:
        return changed  # recorded before runs hashed their inputs: the settings alone

    def digests(fingerprint: dict, role: str) -> dict[str, str]:
        files = fingerprint["inputs"].get(role, {}).get("files", {})
        return {name: f["sha256"] for name, f in files.items()}

    for role in sorted(set(old["inputs"]) | set(new["inputs"])):
        before, now = digests(old, role), digests(new, role)
        for name in sorted(set(before) | set(now)):
            if before.get(name) != now.get(name):
                what = "is gone" if name not in now else "is new" if name not in before else "changed content"
                changed.append(f"{role} file {name} {what}")
    return changed


def _finished(cfg: TrainConfig) -> bool:
    """Whether `out` already holds this run's final model (and its record), trained with the same settings
    and inputs; refuses a final model of other settings rather than overwrite it."""
    out = Path(cfg.out)
    record = _read_json(out / "train_record.json")
    if not record or "settings" not in record or _weights_problem(out / "final") or not (out / "final").is_dir():
        return False  # no record: killed between writing the final model and its record, or never finished
    changed = _changes(record["settings"], _settings_fingerprint(cfg, record["settings"]))
    if changed:
        raise TrainError(
            f"{out} holds a final model trained with other settings ({changed}); it is kept. Use another out, "
            "or resume=none to train again in this folder (replacing it)."
        )
    return True


def _resume_from(cfg: TrainConfig, current: dict | None = None) -> str | None:
    """The checkpoint to resume from: with `auto`, the last complete one in `out` (incomplete ones are skipped,
    and set aside by `_tidy`); with a path, that one, which must be complete. `current`: this run's fingerprint,
    if computed already."""
    if cfg.resume == "none":
        return None
    if cfg.resume != "auto":
        folder = Path(cfg.resume)
        problem = _checkpoint_problem(folder) if folder.is_dir() else "no such folder"
        if problem:
            raise TrainError(
                f"resume={cfg.resume}: not a complete checkpoint ({problem}); name a complete checkpoint-N, "
                "or use resume=auto"
            )
        return cfg.resume
    out = Path(cfg.out)
    complete, incomplete = _checkpoints(out) if out.is_dir() else ([], {})
    recorded = _read_json(out / "run_settings.json")
    if complete and recorded is not None:
        if "inputs" not in recorded:
            log.warning("%s/run_settings.json predates hashing the inputs: only the settings are compared", out)
        changed = _changes(recorded, current or _settings_fingerprint(cfg, recorded))
        if changed:
            raise TrainError(
                f"{cfg.out} holds checkpoints of a run with other settings ({changed}); they are "
                "kept. Use another out, or resume=none to start over in this folder."
            )
    if incomplete:
        log.warning(
            "%s: not resuming from incomplete checkpoint(s): %s",
            out,
            "; ".join(f"{p.name} ({why})" for p, why in incomplete.items()),
        )
    if complete:
        log.info("resuming from %s, the last complete checkpoint", complete[-1])
    return str(complete[-1]) if complete else None


def _one_process_env(cfg: TrainConfig) -> list[str]:
    """Describe a one-process world the way torchrun would, for DeepSpeed started without a launcher (plain
    `atlantis train`, a one-process smoke run), which otherwise looks for MPI (mpi4py) to find its rank.
    Returns the variables set, for the caller to remove."""
    if resolve_deepspeed(cfg.deepspeed) is None or "RANK" in os.environ:
        return []
    env = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }
    env = {k: v for k, v in env.items() if k not in os.environ}
    os.environ.update(env)
    log.info("DeepSpeed in one process without a launcher: %s", " ".join(f"{k}={v}" for k, v in env.items()))
    return list(env)


def train(cfg: TrainConfig, callbacks: list | None = None):
    """Fine-tune `cfg.model` on `cfg.data`; returns the Trainer (its state holds the log history), or None when
    `out` holds the finished run already (resume=auto, same settings and inputs)."""
    added = _one_process_env(cfg)
    try:
        return _train(cfg, callbacks)
    finally:
        for name in added:  # a Python caller's later runs must not inherit a made-up world
            os.environ.pop(name, None)


def _train(cfg: TrainConfig, callbacks: list | None):
    cfg.validate()
    check_model_source(cfg.model, cfg.trust_remote_code)
    out = Path(cfg.out)
    if cfg.resume == "auto" and _finished(cfg):
        log.info("%s: already finished (its final model and record match these settings and inputs)", out)
        return None
    # one run writes a folder at a time (its checkpoints, tidy-ups and final model): `<out>.lock`, shared by the
    # ranks of this job, taken over from a holder that is gone
    lock = OutputLock(out, TrainError, "atlantis train")
    lock.acquire()
    try:
        return _train_locked(cfg, callbacks, out)
    finally:
        lock.release()


def _train_locked(cfg: TrainConfig, callbacks: list | None, out: Path):
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    for name, value in cfg.from_preset.items():
        log.info("%s=%s from preset %s (Table 6, steps read as %s)", name, value, cfg.preset, cfg.table6_steps)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    dataset = build_dataset(cfg, tokenizer)  # all data and weight errors surface before the model loads
    # rank 0 records the fingerprint; the others compute it only to compare with a recorded one
    fingerprint = _settings_fingerprint(cfg, _read_json(out / "run_settings.json")) if rank() == 0 else None
    resume_from = _resume_from(cfg, fingerprint)  # a refused resume too surfaces before the model loads
    if rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        _tidy(out, _checkpoints(out)[1])
        _write_json(out / "run_settings.json", fingerprint)
    if (
        resolve_deepspeed(cfg.deepspeed)
        and int(os.environ.get("WORLD_SIZE", "1")) > 1
        and not torch.cuda.is_available()
    ):
        # ZeRO-3 partitions the model while from_pretrained builds it (zero.Init), which reads the world size
        # from deepspeed.comm; on CPU nothing else initialises it before that point, so do it here (gloo).
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    # TrainingArguments first: under ZeRO-3 it registers the DeepSpeed config, so that from_pretrained builds
    # the model inside deepspeed.zero.Init (each rank allocates only its partition, offloaded to CPU RAM with
    # zero3_offload; rank 0 reads the checkpoint memory-mapped, the others read none) instead of every rank
    # holding a full copy. Without ZeRO-3, transformers 5 always builds on the meta device and loads the
    # checkpoint into it (what low_cpu_mem_usage=True did before), so one copy per rank in the load dtype.
    args = training_arguments(cfg)
    zero3 = is_deepspeed_zero3_enabled()
    dtype = load_dtype(cfg)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if zero3 and not all(hasattr(p, "ds_id") for p in model.parameters()):
        raise TrainError(
            "ZeRO-3 is on but from_pretrained returned unpartitioned weights: the model was not built under "
            "deepspeed.zero.Init, so every rank would hold a full copy"
        )
    log.info("loaded %s in %s%s", cfg.model, dtype, " partitioned by ZeRO-3 at load" if zero3 else "")
    model.config.use_cache = False
    if cfg.lora.enabled:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        model = get_peft_model(
            model,
            PeftLoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=list(cfg.lora.target_modules),
                task_type="CAUSAL_LM",
            ),
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=WeightedCollator(pad_id or 0),
        processing_class=tokenizer,
        normalization=cfg.normalization,
        loss_chunk=cfg.loss_chunk,
        verify=cfg.verify,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume_from)
    # Written into tmp-final and renamed: a `final` folder is always complete (the workflow's output, and what
    # a rerun takes as done).
    final, staging = out / "final", out / f"{STAGING}final"
    with _saving(staging, out, "final"):
        if cfg.lora.enabled and not trainer.is_deepspeed_enabled:
            # A LoRA run's final model is the merged model, loadable like any other (score, generate, lm-eval).
            merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            if trainer.is_world_process_zero():
                merged.save_pretrained(staging)
        else:
            trainer.save_model(str(staging))  # safetensors; ZeRO-3 gathers the 16-bit weights (shipped configs)
        if trainer.is_world_process_zero():
            if dataset.template_name != "model":
                # The final model answers in the format it was trained on (e.g. `plain` for a base model without
                # a template): generation then renders prompts with it and stops at its end-of-turn token.
                tokenizer.chat_template = dataset.template
            tokenizer.save_pretrained(staging)
    trainer.accelerator.wait_for_everyone()  # ZeRO-3 without 16-bit gathering: every rank writes its partition
    if trainer.is_world_process_zero():
        _publish(staging, final)
        record = {
            "config": config_lib.to_dict(cfg),
            "chat_template": dataset.template_name,
            "partitioned_at_load": zero3,
            "log_history": trainer.state.log_history,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "settings": fingerprint,  # what a rerun compares to find the run finished
        }
        with _saving(out / f"{STAGING}train_record.json", out, "train_record.json"):
            _write_json(out / "train_record.json", record)
        log.info("saved the final model to %s", final)
        if not cfg.keep_checkpoints:
            for checkpoint in sorted(out.glob("checkpoint-*")):
                shutil.rmtree(checkpoint)
                log.info("deleted %s (keep_checkpoints=false)", checkpoint)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # A clean teardown: ranks leaving while gloo still has work in flight can abort at exit.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return trainer
