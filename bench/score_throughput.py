"""Scorer throughput: atlantis's batched, chunked scorer vs a batch-1 full-logits scorer (Superfiltering style).

Same model, same real ShareGPT conversations, same rendering, same process launch; each scorer runs in
its own child process so that peak RSS is its own. Prints, per model: samples/s and tokens/s of both,
the ratio, achieved GFLOP/s against an fp32 GEMM peak measured in the same run, peak RSS, and the size
of the `[B, T, V]` fp32 logits tensor our largest batch would have needed.

    python bench/score_throughput.py --model tiny --n 256
    python bench/score_throughput.py --model smollm2 --n 48
    python bench/score_throughput.py --model gemma3 --n 24

Real models come from PyPI packages as GGUF (see bench/assets.py); nothing is downloaded from a hub.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from atlantis.data import DataConfig, load_samples  # noqa: E402
from atlantis.models import load_model, load_tokenizer  # noqa: E402
from atlantis.render import RenderConfig, Renderer  # noqa: E402
from atlantis.scoring import collate, make_batches, response_logprobs  # noqa: E402


def gemm_peak(threads: int, n: int = 2048, reps: int = 6) -> float:
    """Best fp32 GEMM GFLOP/s over a few n x n multiplies."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def flops(model, rendered, head_all_positions: bool) -> float:
    """Forward FLOPs: 2 x body params per token, causal attention, LM head where it is applied."""
    cfg = model.config.get_text_config()
    emb = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight
    body = (
        sum(p.numel() for p in model.parameters())
        - emb
        - (0 if head is model.get_input_embeddings().weight else head.numel())
    )
    d_attn = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    total = 0.0
    for r in rendered:
        t = len(r)
        total += 2 * body * t + 2 * cfg.num_hidden_layers * t * t * d_attn  # QK^T and AV, causal half
        total += 2 * head.shape[0] * head.shape[1] * ((t - 1) if head_all_positions else r.n_response)
    return total


def _child(kind: str, model_dir: str, rendered, threads: int, cfg: dict, queue) -> None:
    torch.set_num_threads(threads)
    model = load_model(model_dir, torch.float32, torch.device("cpu"))
    pad = cfg["pad_id"]
    rss_loaded = _rss_mb()
    # warm-up on the shortest sample so that one-off allocations are not timed
    warm = collate([min(rendered, key=len)], pad, torch.device("cpu"))
    response_logprobs(model, *warm)
    sums: dict[str, float] = {}
    start = time.perf_counter()
    if kind == "atlantis":
        max_tv = 0
        for batch in make_batches(rendered, cfg["max_tokens"], cfg["max_batch"]):
            ids, attn, labels = collate(batch, pad, torch.device("cpu"))
            max_tv = max(max_tv, ids.numel())
            s, _ = response_logprobs(model, ids, attn, labels, cfg["head_chunk"])
            sums.update({r.id: float(v) for r, v in zip(batch, s)})
    else:
        # Like Superfiltering's get_perplexity_and_embedding_part_text: one sample per call, labels -100 on
        # the prompt, the model's own loss over full-vocabulary logits.
        max_tv = max(len(r) for r in rendered)
        with torch.no_grad():
            for r in rendered:
                ids = torch.tensor([r.input_ids])
                labels = ids.clone()
                labels[0, ~torch.tensor(r.labels_mask)] = -100
                loss = model(input_ids=ids, labels=labels).loss
                sums[r.id] = -float(loss) * r.n_response
    seconds = time.perf_counter() - start
    queue.put(
        {
            "seconds": seconds,
            "rss_loaded_mb": rss_loaded,
            "rss_peak_mb": _rss_mb(),
            "sums": sums,
            "max_bt": max_tv,
            "flops": flops(model, rendered, kind != "atlantis"),
        }
    )


def run(kind, model_dir, rendered, threads, cfg):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(kind, model_dir, rendered, threads, cfg, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def resolve_model(name: str, cache: Path) -> str:
    import assets

    if name == "tiny":
        from atlantis.testing import build_tiny_model

        folder = cache / "tiny-llama"
        if not (folder / "config.json").exists():
            build_tiny_model(folder, "llama", instruct=True, hidden_size=256, num_layers=4)
        return str(folder)
    if name == "smollm2":
        return str(assets.smollm2_135m_instruct(cache))
    if name == "gemma3":
        return str(assets.gemma3_270m(cache))
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | smollm2 | gemma3 | a model folder")
    ap.add_argument("--n", type=int, default=64, help="ShareGPT conversations to score")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=8192, help="padded tokens per batch (ours)")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--head-chunk", type=int, default=None, help="default: 64 MiB of logits per chunk")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()

    import assets

    cache = assets.default_cache_dir()
    model_dir = resolve_model(args.model, cache)
    records = assets.sharegpt_conversations(args.n, seed=0, human_first=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sharegpt.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        samples = load_samples(DataConfig(path=str(path), on_invalid="skip", on_duplicate="keep_first"))
    tok = load_tokenizer(model_dir)
    rendered, _ = Renderer(tok, RenderConfig(max_length=args.max_length)).render(samples)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    cfg = {"pad_id": pad, "max_tokens": args.max_tokens, "max_batch": args.max_batch, "head_chunk": args.head_chunk}

    peak = gemm_peak(args.threads)
    ours = run("atlantis", model_dir, rendered, args.threads, cfg)
    base = run("batch1", model_dir, rendered, args.threads, cfg)
    peak_after = gemm_peak(args.threads)

    n_tok = sum(len(r) for r in rendered)
    diff = max(abs(ours["sums"][k] - base["sums"][k]) for k in ours["sums"])
    vocab = len(tok)
    figures = {
        "model": args.model,
        "model_dir": model_dir,
        "vocab": vocab,
        "samples": len(rendered),
        "tokens": n_tok,
        "max_length": args.max_length,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "gemm_peak_gflops": round(max(peak, peak_after), 1),
        "ours_samples_s": len(rendered) / ours["seconds"],
        "base_samples_s": len(rendered) / base["seconds"],
        "ours_tokens_s": n_tok / ours["seconds"],
        "base_tokens_s": n_tok / base["seconds"],
        "ours_gflops": ours["flops"] / ours["seconds"] / 1e9,
        "base_gflops": base["flops"] / base["seconds"] / 1e9,
        "ours_rss_peak_mb": ours["rss_peak_mb"],
        "ours_rss_over_model_mb": ours["rss_peak_mb"] - ours["rss_loaded_mb"],
        "base_rss_peak_mb": base["rss_peak_mb"],
        "base_rss_over_model_mb": base["rss_peak_mb"] - base["rss_loaded_mb"],
        "full_logits_mb_of_our_largest_batch": ours["max_bt"] * vocab * 4 / 2**20,
        "max_abs_diff_logp_sum": diff,
    }
    figures["speedup_samples_s"] = figures["ours_samples_s"] / figures["base_samples_s"]
    figures["ours_pct_of_peak"] = 100 * figures["ours_gflops"] / figures["gemm_peak_gflops"]
    figures["base_pct_of_peak"] = 100 * figures["base_gflops"] / figures["gemm_peak_gflops"]
    for key, value in figures.items():
        print(f"{key:>36}: {value:.4g}" if isinstance(value, float) else f"{key:>36}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
