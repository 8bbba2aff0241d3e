"""Score responses: sum and mean of response-token log-probabilities of each sample under one model.

These are the log p(y|x) terms of the ATLANTIS weight (paper §2.2, Algorithm 1 line 1) and of IFD.

How it differs from the public scripts (batch 1, full-vocabulary logits, results by position, failures
turned into 0 by a bare `except`):

- batched: samples sorted by length, batched under a padded-token budget, so padding is minimal;
- no `[batch, seq, vocab]` logits: the LM head is applied only at positions that predict a response token,
  `head_chunk` rows at a time, log-softmax per chunk (Gemma-3's vocabulary is 262k);
- keyed by sample id, written as Parquet columns named by the model's role (`logp_sum_small`, ...);
- resumable: work is cut into deterministic shards, each written atomically; a killed run restarts where
  it stopped and ends with the same file as an uninterrupted run;
- data-parallel: under torchrun/accelerate (or any launcher setting RANK/WORLD_SIZE) each rank scores the
  shards `i % WORLD_SIZE == RANK`; whichever rank writes the last shard merges them;
- fail loudly: non-finite log-probs stop the run naming the samples; shards already written are kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from atlantis import config as config_lib
from atlantis import provenance
from atlantis.config import field
from atlantis.data import DataConfig, LoadReport, load_samples
from atlantis.lock import OutputLock
from atlantis.log import get_logger, rank, world_size
from atlantis.models import (
    check_model_source,
    finalize_logits,
    load_model,
    load_tokenizer,
    max_positions,
    pick_device,
    pick_dtype,
)
from atlantis.render import RenderConfig, Rendered, Renderer

log = get_logger(__name__)


LOGITS_BUDGET = 64 * 2**20  # bytes of fp32 logits per LM-head chunk when head_chunk is not set


class ScoringError(RuntimeError):
    """Scoring cannot go on (non-finite values, a changed config over existing shards, ...)."""


@dataclass
class ScoreConfig:
    model: str = field(help="Model folder or Hub id (loaded with from_pretrained).")
    role: str = field(help="Column suffix naming the model's role, e.g. small, ref, large, direct.")
    out: str = field(help="Output Parquet file, keyed by id.")
    data: DataConfig = field(help="The data to score.")
    render: RenderConfig = field(default_factory=RenderConfig, help="How samples are rendered.")
    max_tokens_per_batch: int = field(16384, help="Padded tokens per forward pass (batch x longest).")
    max_batch_size: int = field(64, help="At most this many samples per forward pass.")
    head_chunk: int | None = field(
        None, help="Response positions per LM-head chunk; default: as many as fit 64 MiB of fp32 logits."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        "auto", help="`auto`: float32 on CPU, bfloat16 on GPU."
    )
    device: str = field("auto", help="`auto` (cuda:LOCAL_RANK if available, else cpu) or a torch device.")
    shard_size: int = field(512, help="Samples per resumable shard.")
    trust_remote_code: bool = field(False, help="Allow a model folder's own Python code to run.")
    verify: bool = field(True, help="Check the first batch against the model's full-logits forward on one sample.")
    overwrite: bool = field(False, help="Replace an existing output file (never done silently).")
    keep_shards: bool = field(False, help="Keep the shard folder after merging.")

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", self.role):
            raise ValueError(f"role must be an identifier (letters, digits, _), got {self.role!r}")
        if not self.out.endswith(".parquet"):
            raise ValueError(f"out must be a .parquet file, got {self.out!r}")
        for name in ("max_tokens_per_batch", "max_batch_size", "head_chunk", "shard_size"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


def columns(role: str) -> dict[str, str]:
    """Column names written for a role."""
    return {
        "sum": f"logp_sum_{role}",
        "ntok": f"ntok_{role}",
        "mean": f"logp_mean_{role}",
        "ntok_full": f"ntok_full_{role}",
        "truncated": f"truncated_{role}",
        # sha256 of the scored tokens decoded: two roles scored the same y exactly when these are equal
        "y_sha": f"y_sha_{role}",
    }


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------- the math


@torch.no_grad()
def response_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels_mask: torch.Tensor,
    head_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (sum of response-token log-probs [float64], number of response tokens).

    `labels_mask[b, t]` marks token t of row b as a response token; it is predicted from position t-1.
    Only those positions go through the LM head, `head_chunk` at a time, so memory is
    O(head_chunk x vocab) instead of O(batch x seq x vocab).
    """
    base = getattr(model, model.base_model_prefix)
    # Rows are right-padded, so under causal attention a real token never sees a pad token (pads lie in its
    # future). The padding mask is therefore redundant for every position we read, and leaving it out keeps
    # SDPA on its fused causal kernel instead of materialising a [batch, heads, seq, seq] mask.
    right_padded = bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
    hidden = base(input_ids=input_ids, attention_mask=None if right_padded else attention_mask).last_hidden_state
    predict = labels_mask[:, 1:].bool()
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(predict)[predict]
    h = hidden[:, :-1][predict]
    targets = input_ids[:, 1:][predict]
    head = model.get_output_embeddings()
    if head_chunk is None:  # rows per chunk so that one chunk of fp32 logits stays near LOGITS_BUDGET bytes
        head_chunk = max(16, LOGITS_BUDGET // (4 * head.weight.shape[0]))
    token_lp = torch.empty(targets.shape[0], dtype=torch.float32, device=h.device)
    for s in range(0, targets.shape[0], head_chunk):
        logits = finalize_logits(model.config, head(h[s : s + head_chunk]).float())
        picked = logits.gather(1, targets[s : s + head_chunk, None])[:, 0]
        top = logits.max(dim=-1).values
        # log-sum-exp in place: no second [chunk, vocab] temporary
        lse = logits.sub_(top[:, None]).exp_().sum(dim=-1).log_() + top
        token_lp[s : s + head_chunk] = picked - lse
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float64, device=h.device)
    sums.index_add_(0, rows, token_lp.double())
    return sums, labels_mask[:, 1:].sum(dim=1)


@torch.no_grad()
def reference_logprob(model, sample: Rendered, device: torch.device) -> float:
    """Batch-1, full-logits log p(response): the naive path, used to verify the fast one."""
    ids = torch.tensor([sample.input_ids], device=device)
    logits = model(input_ids=ids).logits[0, :-1].float()
    mask = torch.tensor(sample.labels_mask[1:], device=device)
    lp = logits.log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
    return float(lp[mask].double().sum())


def make_batches(samples: Sequence[Rendered], max_tokens: int, max_batch: int) -> list[list[Rendered]]:
    """Greedy batches over samples sorted by length: each batch's padded size stays under `max_tokens`."""
    batches: list[list[Rendered]] = []
    current: list[Rendered] = []
    for s in sorted(samples, key=lambda r: (len(r), r.id)):
        if current and (len(current) >= max_batch or (len(current) + 1) * len(s) > max_tokens):
            batches.append(current)
            current = []
        current.append(s)
    if current:
        batches.append(current)
    return batches


def collate(batch: Sequence[Rendered], pad_id: int, device: torch.device):
    width = max(len(s) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.zeros((len(batch), width), dtype=torch.bool)
    for i, s in enumerate(batch):  # right padding: positions stay 0..len-1 as in the batch-1 forward
        ids[i, : len(s)] = torch.tensor(s.input_ids)
        attn[i, : len(s)] = 1
        labels[i, : len(s)] = torch.tensor(s.labels_mask)
    return ids.to(device), attn.to(device), labels.to(device)


# ----------------------------------------------------------------------------------------- the run


def _fingerprint(cfg: ScoreConfig, rendered: Sequence[Rendered], template: str) -> dict[str, Any]:
    """What the shards' numbers depend on, by part (settings, the rendered data, the model's content), so that a
    resume over shards of another run can say which part changed. `fingerprint_hash` condenses it."""
    settings = {
        k: v
        for k, v in config_lib.to_dict(cfg).items()
        # batch shapes do not change any score beyond float noise: a run may resume with smaller batches. The
        # model's path does not matter either, its content does (the "model" part): a model moved elsewhere
        # resumes, a model replaced in place at the same path does not.
        if k
        not in (
            "model",
            "out",
            "overwrite",
            "keep_shards",
            "verify",
            "device",
            "max_tokens_per_batch",
            "max_batch_size",
            "head_chunk",
        )
    }
    settings["dtype"] = str(pick_dtype(cfg.dtype, pick_device(cfg.device)))  # the one actually used
    settings["data"] = {k: v for k, v in settings["data"].items() if k != "path"}
    data = hashlib.sha256(template.encode())
    for r in rendered:
        data.update(r.id.encode() + b"\0")
        data.update(torch.tensor(r.input_ids, dtype=torch.int64).numpy().tobytes())
        data.update(bytes(r.labels_mask))
    return {
        "settings": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(),
        "data": data.hexdigest(),
        "model": provenance.model_content(cfg.model),
    }


def fingerprint_hash(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _what_differs(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """The parts of two fingerprints that differ, in words (the model's files by name)."""
    if not isinstance(old, dict) or set(old) != set(new):  # a manifest of an older atlantis: no parts to compare
        return "the data, the settings or the model"
    said = []
    if old["settings"] != new["settings"]:
        said.append("the score settings")
    if old["data"] != new["data"]:
        said.append("the rendered data (its records, template or render settings)")
    om, nm = old["model"], new["model"]
    if om != nm and "files" in om and "files" in nm:
        changed = sorted(n for n in {*om["files"], *nm["files"]} if om["files"].get(n) != nm["files"].get(n))
        shown = [
            f"{n} (sha256 {om['files'].get(n, 'absent')[:12]} then, {nm['files'].get(n, 'absent')[:12]} now)"
            for n in changed[:3]
        ]
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        said.append(f"the model's files {', '.join(shown)}{more} (a model replaced in place?)")
    elif om != nm:
        said.append(f"the model ({om} then, {nm} now)")
    return " and ".join(said)


def _schema(role: str) -> pa.Schema:
    c = columns(role)
    return pa.schema(
        [
            ("id", pa.string()),
            (c["sum"], pa.float64()),
            (c["ntok"], pa.int32()),
            (c["mean"], pa.float64()),
            (c["ntok_full"], pa.int32()),
            (c["truncated"], pa.bool_()),
            (c["y_sha"], pa.string()),
        ]
    )


def _atomic_write_table(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class _Scorer:
    def __init__(self, cfg: ScoreConfig, pad_id: int):
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        self.model = load_model(cfg.model, self.dtype, self.device, cfg.trust_remote_code)
        self.pad_id = pad_id
        self.verified = not cfg.verify
        self.tokens, self.started = 0, time.perf_counter()

    def score_shard(self, shard: Sequence[Rendered], bar: tqdm) -> pa.Table:
        c = columns(self.cfg.role)
        rows: dict[str, list] = {k: [] for k in ("id", "sum", "ntok", "mean", "ntok_full", "truncated", "y_sha")}
        for batch in make_batches(shard, self.cfg.max_tokens_per_batch, self.cfg.max_batch_size):
            ids, attn, labels = collate(batch, self.pad_id, self.device)
            sums, counts = response_logprobs(self.model, ids, attn, labels, self.cfg.head_chunk)
            sums, counts = sums.cpu(), counts.cpu()
            bad = [s.id for s, v in zip(batch, sums) if not torch.isfinite(v)]
            if bad:
                raise ScoringError(
                    f"non-finite log-probabilities for sample(s) {bad[:10]} under "
                    f"{self.cfg.model}; shards already written are kept"
                )
            if not self.verified:
                self._verify(batch[0], float(sums[0]))
            for s, total, n in zip(batch, sums.tolist(), counts.tolist()):
                assert n == s.n_response, (s.id, n, s.n_response)
                rows["id"].append(s.id)
                rows["sum"].append(total)
                rows["ntok"].append(n)
                rows["mean"].append(total / n)
                rows["ntok_full"].append(s.n_response_full)
                rows["truncated"].append(s.truncated)
                rows["y_sha"].append(text_hash(s.response_text))
            self.tokens += int(attn.sum())
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{self.tokens / (time.perf_counter() - self.started):.0f}", refresh=False)
        return pa.table(
            {
                "id": rows["id"],
                c["sum"]: rows["sum"],
                c["ntok"]: rows["ntok"],
                c["mean"]: rows["mean"],
                c["ntok_full"]: rows["ntok_full"],
                c["truncated"]: rows["truncated"],
                c["y_sha"]: rows["y_sha"],
            },
            schema=_schema(self.cfg.role),
        )

    def _verify(self, sample: Rendered, fast: float) -> None:
        ref = reference_logprob(self.model, sample, self.device)
        tol = (2e-4 if self.dtype == torch.float32 else 5e-2) * max(sample.n_response, 1) + 1e-4
        if abs(ref - fast) > tol:
            raise ScoringError(
                f"{self.cfg.model}: the chunked LM-head path gives {fast:.6f} but the model's own forward "
                f"gives {ref:.6f} for sample {sample.id}; this architecture post-processes logits in a way "
                "atlantis does not replicate. Please report it (verify=false skips this check)."
            )
        log.info("verified the chunked scorer against the full forward (|diff| = %.2e)", abs(ref - fast))
        self.verified = True


def score(cfg: ScoreConfig) -> Path | None:
    """Score `cfg.data` under `cfg.model`; returns the merged output path, or None if other ranks remain.

    One invocation writes an output at a time (`OutputLock`); the ranks of one multi-rank job share it."""
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise ScoringError(f"{out} exists; scores are never overwritten silently (pass overwrite=true)")
    lock = OutputLock(out, ScoringError, "atlantis score")
    lock.acquire()
    merged = None
    try:
        merged = _score(cfg, out)
    finally:
        # A rank that does not merge leaves the lock to the rank that will (its job's other ranks still write);
        # after a failure of a multi-rank job the lock stays too: a rerun of the same job takes it again, and
        # another invocation finds its pid dead or its heartbeat stopped.
        if world_size() == 1 or merged is not None:
            lock.release()
        else:
            lock.stop()
    return merged


def _score(cfg: ScoreConfig, out: Path) -> Path | None:
    if out.exists() and not cfg.overwrite:  # written by another invocation while this one waited for the lock
        raise ScoringError(f"{out} exists; scores are never overwritten silently (pass overwrite=true)")
    check_model_source(cfg.model, cfg.trust_remote_code)  # before any data work
    load_report = LoadReport()
    samples = load_samples(cfg.data, load_report)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    limit = max_positions(cfg.model, cfg.trust_remote_code)
    if limit is not None and cfg.render.max_length > limit:
        log.warning(
            "render.max_length=%d exceeds the model's %d positions: truncating at %d",
            cfg.render.max_length,
            limit,
            limit,
        )
        cfg.render = dataclasses.replace(cfg.render, max_length=limit)
    renderer = Renderer(tokenizer, cfg.render)
    rendered, truncated_away = renderer.render(samples)
    if not rendered:  # before the shard folder exists: a run that cannot start leaves nothing behind
        ids = [e["id"] for e in truncated_away]
        reasons = sorted({e["reason"] for e in truncated_away})
        fix = (
            f"raise render.max_length (now {cfg.render.max_length}) so that some response fits after its prompt"
            if any(r.startswith("response fully truncated") for r in reasons)
            else "see the reasons"
        )
        raise ScoringError(
            f"{cfg.data.path}: no sample has a response token to score: all {len(ids)} are excluded, ids "
            f"{ids[:5]}{' ...' if len(ids) > 5 else ''} ({'; '.join(reasons[:3])}); {fix}"
        )
    order = sorted(rendered, key=lambda r: (len(r), r.id))
    shards = [order[i : i + cfg.shard_size] for i in range(0, len(order), cfg.shard_size)]

    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    made_of = _fingerprint(cfg, order, renderer.template)
    fingerprint = fingerprint_hash(made_of)
    manifest = parts / "manifest.json"
    if manifest.exists():
        old = json.loads(manifest.read_text())
        if old["fingerprint"] != fingerprint:
            raise ScoringError(
                f"{parts} holds shards made from other data or settings; they are kept. What changed: "
                f"{_what_differs(old.get('made_of'), made_of)}. Remove that folder or choose another `out` to "
                "start afresh."
            )
    else:
        _atomic_write_text(
            json.dumps({"fingerprint": fingerprint, "made_of": made_of, "n_shards": len(shards)}), manifest
        )

    shard_path = [parts / f"shard-{i:06d}.parquet" for i in range(len(shards))]
    mine = [i for i in range(len(shards)) if i % world_size() == rank() and not shard_path[i].exists()]
    done_before = sum(1 for i in range(len(shards)) if i % world_size() == rank()) - len(mine)
    if done_before:
        log.info("resuming: %d of this rank's shards already written", done_before)
    started = time.perf_counter()
    if mine:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        scorer = _Scorer(cfg, pad_id if pad_id is not None else 0)
        total = sum(len(shards[i]) for i in mine)
        with tqdm(total=total, desc=f"score {cfg.role}", unit="sample", disable=rank() != 0, dynamic_ncols=True) as bar:
            for i in mine:
                _atomic_write_table(scorer.score_shard(shards[i], bar), shard_path[i])
    elapsed = time.perf_counter() - started

    if _launched_with_process_group():
        # torchrun / accelerate / deepspeed: wait for every rank, rank 0 merges, the others wait for it.
        group_created = _barrier()
        if rank() != 0:
            _barrier(destroy=group_created)
            return None
    elif not all(p.exists() for p in shard_path) or not _take_merge_lock(parts):
        # Independent jobs sharing a folder (e.g. a SLURM array): whoever writes the last shard merges.
        log.info("rank %d done; another rank merges the shards (or rerun with one process to merge)", rank())
        return None
    else:
        group_created = False
    missing = [p.name for p in shard_path if not p.exists()]
    if missing:
        raise ScoringError(f"{parts}: shards {missing[:5]} are missing; a rank failed (its shards are kept, rerun)")
    table = pa.concat_tables([pq.read_table(p) for p in shard_path]).sort_by("id")
    if table.num_rows != len(order) or len(set(table.column("id").to_pylist())) != len(order):
        raise ScoringError(f"{parts}: shards hold {table.num_rows} rows for {len(order)} samples")
    _atomic_write_table(table, out)
    report = {
        "model": cfg.model,
        "role": cfg.role,
        "template": renderer.template_name,
        "data": cfg.data.path,
        "n_records": load_report.n_records,
        "n_scored": table.num_rows,
        "n_truncated": int(sum(r.truncated for r in order)),
        "excluded": load_report.excluded + truncated_away,
        "seconds_this_rank": round(elapsed, 3),
        "fingerprint": fingerprint,
        "model_content": made_of["model"],
    }
    _atomic_write_text(json.dumps(report, indent=1), report_path(out))
    if not cfg.keep_shards:
        shutil.rmtree(parts, ignore_errors=True)
    log.info("wrote %s (%d samples, %d excluded)", out, table.num_rows, len(report["excluded"]))
    if _launched_with_process_group():
        _barrier(destroy=group_created)
    return out


def _launched_with_process_group() -> bool:
    return world_size() > 1 and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ


def _barrier(destroy: bool = False) -> bool:
    """A gloo barrier over all ranks (CPU-only, so it works on any launcher); returns whether we created the
    process group, so that the caller can destroy it again."""
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        dist.init_process_group("gloo")
        created = True
    dist.barrier()
    if destroy:
        dist.destroy_process_group()
    return created


def _take_merge_lock(parts: Path) -> bool:
    """Exactly one rank merges: the first to create the lock file (a stale lock is taken over alone)."""
    lock = parts / "merge.lock"
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileNotFoundError:  # another rank merged and removed the shard folder already
        return False
    except FileExistsError:
        if world_size() == 1:
            log.warning("%s: taking over a merge left unfinished by an earlier run", lock)
            return True
        return False


def report_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".parquet") + ".report.json")
