"""Training-step overhead of the ATLANTIS weighted loss, and the loss's peak memory.

Same model, same batch (real ShareGPT conversations, rendered for training), same run. Three variants of one
forward + backward step, timed interleaved so that machine noise hits them alike:

- `stock`: the model's own causal-LM loss, `model(..., labels=..., num_items_in_batch=N).loss` (unweighted,
  full `[B, T, V]` logits, what `Trainer` does for plain SFT);
- `ours_w1`: atlantis's loss path (chunked LM head on response positions) with all weights 1;
- `ours`: the same with non-uniform weights (the ATLANTIS step).

Each variant also runs alone in a child process to measure the peak RSS it adds above the loaded model.

    python bench/train_overhead.py --model smollm2 --batch 4 --seq 256
    python bench/train_overhead.py --model gemma3 --batch 2 --seq 256
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from score_throughput import resolve_model  # noqa: E402

from atlantis.data import DataConfig, load_samples  # noqa: E402
from atlantis.loss import weighted_loss  # noqa: E402
from atlantis.models import load_tokenizer  # noqa: E402
from atlantis.render import RenderConfig, Renderer  # noqa: E402
from atlantis.train import WeightedCollator, response_token_nll  # noqa: E402


def make_batch(model_dir: str, n: int, seq: int) -> dict[str, torch.Tensor]:
    import assets

    records = assets.sharegpt_conversations(4 * n, seed=1, human_first=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        samples = load_samples(DataConfig(path=str(path), on_invalid="skip", on_duplicate="keep_first"))
    tok = load_tokenizer(model_dir)
    rendered, _ = Renderer(tok, RenderConfig(max_length=seq, include_end_of_turn=True)).render(samples)
    rendered = sorted(rendered, key=len, reverse=True)[:n]  # the longest: a full batch, little padding
    feats = [
        {
            "input_ids": r.input_ids,
            "labels": [t if m else -100 for t, m in zip(r.input_ids, r.labels_mask)],
            "weights": 1.0,
        }
        for r in rendered
    ]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    batch = WeightedCollator(pad)(feats)
    batch["weights"] = torch.linspace(0.2, 2.5, n)
    return batch


def step(model, batch, variant: str, chunk: int) -> float:
    model.zero_grad(set_to_none=True)
    n_items = (batch["labels"][:, 1:] != -100).sum()
    if variant == "stock":
        loss = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            num_items_in_batch=n_items,
            use_cache=False,
        ).loss
    else:
        w = batch["weights"] if variant == "ours" else torch.ones_like(batch["weights"])
        nll, mask = response_token_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk)
        loss = weighted_loss(nll, mask, w, n_items)
    loss.backward()
    return float(loss.detach())


def load(model_dir: str, threads: int):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    return model.train()


def peak_rss_above(fn) -> float:
    """MB of RSS that `fn()` adds at its peak, sampled every 2 ms by a thread (ru_maxrss would be dominated
    by model loading)."""
    import threading

    import psutil

    proc = psutil.Process()
    before = proc.memory_info().rss
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    thread = threading.Thread(target=sample)
    thread.start()
    fn()
    done.set()
    thread.join()
    return (peak[0] - before) / 2**20


def _step_child(model_dir, batch, variant, chunk, threads, queue):
    """Peak RSS one training step adds above the warmed-up model."""
    model = load(model_dir, threads)
    step(model, batch, variant, chunk)  # warm-up: allocator pools and oneDNN scratch exist before we measure
    model.zero_grad(set_to_none=True)
    queue.put(peak_rss_above(lambda: step(model, batch, variant, chunk)))


def _loss_child(model_dir, tokens, variant, chunk, threads, queue):
    """Peak RSS of the loss alone on `tokens` response positions of random hidden states (head, softmax, backward)."""
    from atlantis.train import LOSS_LOGITS_BUDGET, _chunk_nll

    model = load(model_dir, threads)
    head, config = model.get_output_embeddings(), model.config
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, head.weight.shape[1], generator=g, requires_grad=True)
    targets = torch.randint(0, head.weight.shape[0], (tokens,), generator=g)
    rows = chunk or max(16, LOSS_LOGITS_BUDGET // (4 * head.weight.shape[0]))

    def run():
        if variant == "stock":  # full logits, upcast, cross-entropy: what the model's own loss does
            loss = torch.nn.functional.cross_entropy(head(hidden).float(), targets)
        else:
            parts = (
                torch.utils.checkpoint.checkpoint(
                    _chunk_nll, hidden[s : s + rows], targets[s : s + rows], head, config, use_reentrant=False
                ).sum()
                for s in range(0, tokens, rows)
            )
            loss = sum(parts) / tokens
        loss.backward()

    queue.put(peak_rss_above(run))


def in_child(target, *args) -> float:
    """Run `target(*args, queue)` in a fresh spawned process, so that its peak RSS is its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | smollm2 | gemma3 | a model folder")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one warm-up)")
    ap.add_argument("--chunk", type=int, default=None, help="LM-head rows per loss chunk (default: 64 MiB)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--loss-tokens", type=int, default=2048, help="response positions for the loss-only memory test")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    import assets

    model_dir = resolve_model(args.model, assets.default_cache_dir())
    batch = make_batch(model_dir, args.batch, args.seq)
    model = load(model_dir, args.threads)
    variants = ("stock", "ours_w1", "ours")
    times: dict[str, list[float]] = {v: [] for v in variants}
    losses = {v: step(model, batch, v, args.chunk) for v in variants}  # warm-up
    for _ in range(args.steps):
        for v in variants:
            t = time.perf_counter()
            step(model, batch, v, args.chunk)
            times[v].append(time.perf_counter() - t)
    del model
    med = {v: statistics.median(ts) for v, ts in times.items()}
    vocab = len(load_tokenizer(model_dir))
    figures = {
        "model": args.model,
        "batch": list(batch["input_ids"].shape),
        "vocab": vocab,
        "response_tokens": int((batch["labels"] != -100).sum()),
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d"),
        **{f"step_s_{v}": med[v] for v in variants},
        "overhead_weighted_vs_w1_pct": 100 * (med["ours"] / med["ours_w1"] - 1),
        "overhead_weighted_vs_stock_pct": 100 * (med["ours"] / med["stock"] - 1),
        "loss_stock": losses["stock"],
        "loss_ours_w1": losses["ours_w1"],
        "loss_ours": losses["ours"],
        "full_logits_fp32_mb": batch["input_ids"].numel() * vocab * 4 / 2**20,
        **{
            f"peak_rss_above_model_mb_{v}": in_child(_step_child, model_dir, batch, v, args.chunk, args.threads)
            for v in ("stock", "ours")
        },
        "loss_only_tokens": args.loss_tokens,
        "loss_only_full_logits_fp32_mb": args.loss_tokens * vocab * 4 / 2**20,
        **{
            f"loss_only_peak_mb_{v}": in_child(_loss_child, model_dir, args.loss_tokens, v, args.chunk, args.threads)
            for v in ("stock", "ours")
        },
    }
    for key, value in figures.items():
        print(f"{key:>34}: {value:.4g}" if isinstance(value, float) else f"{key:>34}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
