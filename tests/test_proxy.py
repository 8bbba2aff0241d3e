"""Proxy-tuning (paper Eq. 9): the decoder's logits, caches, batching and scores against hand computation."""

from __future__ import annotations

import pytest
import torch

from atlantis.models import load_model, load_tokenizer
from atlantis.proxy import (
    ROLES,
    ProxyModel,
    SingleModel,
    VocabularyMismatchError,
    check_vocabularies,
    top_p_filter,
)
from atlantis.testing import build_tiny_model

CPU = torch.device("cpu")
ALPHA = 0.8  # not 1, so that a misplaced alpha shows

# Raw text and chat messages, of different lengths, so that the batch is left-padded.
PROMPTS = [
    "The quick brown",
    [{"role": "user", "content": "What is two plus two?"}],
    "Zorbs are blue; florps are green; 12 + 30 =",
]


@pytest.fixture(scope="module")
def large_dir(tmp_path_factory) -> str:
    """p_b^L: a bigger llama on the same tokenizer as the tiny llama pair."""
    return str(build_tiny_model(tmp_path_factory.mktemp("large"), "llama", seed=5, hidden_size=96, num_layers=3))


@pytest.fixture(scope="module")
def parts(models, large_dir):
    """The three models and tokenizers, loaded once: p_b^L, p_b^S (llama) and p_r (llama-it)."""
    paths = {"large": large_dir, "small": models["llama"], "ref": models["llama-it"]}
    return (
        {r: load_model(p, torch.float32, CPU) for r, p in paths.items()},
        {r: load_tokenizer(p) for r, p in paths.items()},
    )


def make_proxy(parts, alpha: float = ALPHA) -> ProxyModel:
    mods, toks = parts
    return ProxyModel(mods["large"], mods["small"], mods["ref"], toks, alpha=alpha)


@torch.no_grad()
def last_logits(model, ids: list[int]) -> torch.Tensor:
    """The model's own full forward, no cache, no padding: logits after `ids`."""
    return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def eq9(parts, prompt_ids: dict[str, list[int]], alpha: float, vocab: int) -> torch.Tensor:
    mods, _ = parts
    s = {r: last_logits(mods[r], prompt_ids[r])[:vocab] for r in ROLES}
    return s["large"] + alpha * (s["ref"] - s["small"])


def test_logits_are_eq9_from_full_forwards_at_every_step(parts):
    proxy = make_proxy(parts)
    gens = proxy.generate(PROMPTS, max_new_tokens=10, output_scores=True)
    lengths = {len(proxy.prompt_ids(p)["ref"]) for p in PROMPTS}
    assert len(lengths) == len(PROMPTS)  # really left-padded
    for prompt, gen in zip(PROMPTS, gens):
        ids = proxy.prompt_ids(prompt)
        assert len(gen.token_ids) == 10 and gen.scores.shape == (10, proxy.vocab_size)
        for t, tok in enumerate(gen.token_ids):
            prefix = {r: ids[r] + gen.token_ids[:t] for r in ROLES}
            expected = eq9(parts, prefix, ALPHA, proxy.vocab_size)
            torch.testing.assert_close(gen.scores[t], expected, atol=1e-5, rtol=0)
            assert tok == int(expected.argmax())  # greedy


def test_chat_prompt_is_rendered_with_generation_prompt(parts):
    proxy = make_proxy(parts)
    texts = proxy.render(PROMPTS[1])
    assert texts["ref"] == "<s>[INST] What is two plus two? [/INST]"
    assert texts["large"] == texts["small"] == texts["ref"]  # the same x for all three models (Eq. 9)
    ids = proxy.prompt_ids(PROMPTS[1])["ref"]
    assert ids.count(proxy.tokenizer.bos_token_id) == 1  # the template's BOS is not doubled

    mods, toks = parts
    plain_base = ProxyModel(mods["large"], mods["small"], mods["ref"], toks, base_template="plain")
    texts = plain_base.render(PROMPTS[1])
    assert texts["large"] == texts["small"] == "User: What is two plus two?\n\nAssistant:\n"


def test_alpha_zero_is_the_large_models_greedy_decoding(parts):
    mods, toks = parts
    proxy = make_proxy(parts, alpha=0.0)
    raw = [PROMPTS[0], PROMPTS[2]]
    gens = proxy.generate(raw, max_new_tokens=12, output_scores=True)
    single = SingleModel(mods["large"], toks["large"]).generate(raw, max_new_tokens=12, output_scores=True)
    for prompt, gen, alone in zip(raw, gens, single):
        ids = toks["large"](prompt, return_tensors="pt")
        ref = mods["large"].generate(**ids, do_sample=False, max_new_tokens=12, pad_token_id=toks["large"].pad_token_id)
        assert gen.token_ids == ref[0, ids["input_ids"].shape[1] :].tolist()
        assert torch.equal(gen.scores, alone.scores)  # s_L + 0 (s_r - s_S) is s_L exactly


def test_kv_cache_matches_full_prefix_recomputation(parts):
    proxy = make_proxy(parts)
    widths = []
    hook = parts[0]["large"].register_forward_pre_hook(
        lambda _m, _a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        cached = proxy.generate(PROMPTS, max_new_tokens=10, output_scores=True)
    finally:
        hook.remove()
    longest = max(len(proxy.prompt_ids(p)["large"]) for p in PROMPTS)
    assert widths == [longest] + [1] * 9  # the prompt once, then one token per step
    full = proxy.generate(PROMPTS, max_new_tokens=10, output_scores=True, use_cache=False)
    for a, b in zip(cached, full):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)


def test_batched_equals_one_by_one_and_finished_rows_leave_the_batch(parts):
    proxy = make_proxy(parts)
    free = proxy.generate(PROMPTS, max_new_tokens=10)
    # Make the token that the first prompt picks at step 2 an EOS, so that rows finish at different steps.
    proxy.stop_token_ids = {free[0].token_ids[2]}
    batched = proxy.generate(PROMPTS, max_new_tokens=10, output_scores=True)
    assert batched[0].finish_reason == "eos" and len(batched[0].token_ids) <= 3
    assert batched[0].text == proxy.tokenizer.decode(batched[0].token_ids[:-1], skip_special_tokens=True)
    assert any(g.finish_reason == "length" for g in batched)
    for prompt, gen in zip(PROMPTS, batched):
        alone = proxy.generate([prompt], max_new_tokens=10, output_scores=True)[0]
        assert gen.token_ids == alone.token_ids and gen.finish_reason == alone.finish_reason
        torch.testing.assert_close(gen.scores, alone.scores, atol=1e-5, rtol=0)


def test_stop_string_cuts_the_text(parts):
    proxy = make_proxy(parts)
    free = proxy.generate([PROMPTS[0]], max_new_tokens=12)[0]
    pieces = [proxy.tokenizer.decode([t]) for t in free.token_ids]
    k = next(i for i in range(2, len(pieces)) if pieces[i].strip().isascii() and pieces[i].strip().isalnum())
    stop = pieces[k].strip()
    cut = proxy.generate([PROMPTS[0]], max_new_tokens=12, stop=[stop])[0]
    assert cut.finish_reason == "stop" and len(cut.token_ids) <= k + 1
    assert cut.text == free.text[: free.text.find(stop)]


def test_sampling_is_deterministic_for_a_seed(parts):
    proxy = make_proxy(parts)
    kw = dict(max_new_tokens=12, temperature=0.9, top_p=0.9)
    a = proxy.generate(PROMPTS, seed=123, **kw)
    b = proxy.generate(PROMPTS, seed=123, **kw)
    c = proxy.generate(PROMPTS, seed=124, **kw)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    # Per-prompt seeds: a prompt's sample does not depend on the other prompts of its batch.
    both = proxy.generate(PROMPTS[:2], seed=[11, 22], **kw)
    alone = proxy.generate(PROMPTS[1:2], seed=[22], **kw)
    assert both[1].token_ids == alone[0].token_ids


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([0.05, 0.5, 0.15, 0.3]).log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p)).nonzero()[:, 0].tolist()  # noqa: E731
    assert kept(1.0) == [0, 1, 2, 3]
    assert kept(0.5) == [1]
    assert kept(0.7) == [1, 3]
    assert kept(0.9) == [1, 2, 3]
    assert kept(1e-6) == [1]


def test_mismatched_vocabularies_raise(models, large_dir):
    with pytest.raises(VocabularyMismatchError, match="different vocabularies") as err:
        ProxyModel.from_pretrained(large_dir, models["qwen2"], models["llama-it"], device="cpu")
    assert isinstance(err.value, ValueError)
    tok = load_tokenizer(models["llama"])
    small = load_model(models["llama"], torch.float32, CPU)
    with pytest.raises(VocabularyMismatchError, match="fewer rows"):
        check_vocabularies({"small": small}, {"small": load_tokenizer(models["qwen2"])})
    assert check_vocabularies({"small": small}, {"small": tok}) == len(tok)


def test_padded_lm_head_is_truncated_to_the_tokenizer(parts, large_dir):
    mods, toks = parts
    padded = load_model(large_dir, torch.float32, CPU)
    padded.resize_token_embeddings(len(toks["large"]) + 64)  # as checkpoints pad to a multiple of 64/128
    proxy = ProxyModel(padded, mods["small"], mods["ref"], toks, alpha=ALPHA)
    assert proxy.vocab_size == len(toks["ref"])
    gen = proxy.generate([PROMPTS[0]], max_new_tokens=4, output_scores=True)[0]
    ids = proxy.prompt_ids(PROMPTS[0])
    s = {r: last_logits(m, ids[r] + gen.token_ids[:2]) for r, m in [("small", mods["small"]), ("ref", mods["ref"])]}
    s["large"] = last_logits(padded, ids["large"] + gen.token_ids[:2])
    expected = s["large"][: proxy.vocab_size] + ALPHA * (s["ref"] - s["small"])
    torch.testing.assert_close(gen.scores[2], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("context", ["The quick brown ", [{"role": "user", "content": "Name an animal."}]])
def test_continuation_logprobs_match_hand_computation(parts, context):
    mods, _ = parts
    proxy = make_proxy(parts)
    conts = [" fox jumps over", "dog", " The lazy dog."]
    got = proxy.continuation_logprobs(context, conts, batch_size=2)
    text = context if isinstance(context, str) else proxy.render(context)["ref"]
    tok = proxy.tokenizer
    ctx_ids = proxy.prompt_ids(text.rstrip())  # lm-eval moves trailing whitespace to the continuation
    for cont, res in zip(conts, got):
        whole = proxy.prompt_ids(text + cont)["ref"]
        assert res.token_ids == whole[len(ctx_ids["ref"]) :]
        seq = {r: torch.tensor([ctx_ids[r] + res.token_ids]) for r in ROLES}
        with torch.no_grad():
            s = {r: mods[r](input_ids=seq[r]).logits[0].float() for r in ROLES}
        n = len(ctx_ids["ref"])
        combined = (s["large"] + ALPHA * (s["ref"] - s["small"]))[n - 1 : n - 1 + len(res.token_ids)]
        hand = combined.log_softmax(-1).gather(1, torch.tensor(res.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(res.logprobs, dtype=torch.float32), hand, atol=1e-5, rtol=0)
        assert res.total == pytest.approx(float(hand.double().sum()), abs=1e-4)
        assert res.is_greedy == bool((combined.argmax(-1) == torch.tensor(res.token_ids)).all())
        assert tok.decode(res.token_ids) == (text[len(text.rstrip()) :] + cont)


def test_greedy_continuation_is_flagged(parts):
    proxy = make_proxy(parts)
    gen = proxy.generate([PROMPTS[0]], max_new_tokens=5)[0]
    ids = proxy.prompt_ids(PROMPTS[0])
    other = gen.token_ids[:2] + [gen.token_ids[2] + 1]
    res = proxy.continuation_logprobs_ids(ids, [gen.token_ids[:3], other])
    assert res[0].is_greedy and not res[1].is_greedy
    assert res[0].logprobs[:2] == pytest.approx(res[1].logprobs[:2], abs=1e-6)
    assert res[0].logprobs[2] > res[1].logprobs[2]  # the argmax is the most likely token


def test_sliding_window_model_cache_and_padding(tmp_path):
    """Gemma-2 (sliding window 8, soft-capped logits): cached, batched decoding matches the slow paths."""
    path = str(build_tiny_model(tmp_path / "gemma2", "gemma2", seed=3))
    model = SingleModel(load_model(path, torch.float32, CPU), load_tokenizer(path))
    prompts = ["The quick brown fox jumps over the lazy dog. Write a haiku", "Zorbs"]  # longer than the window
    cached = model.generate(prompts, max_new_tokens=14, output_scores=True)
    full = model.generate(prompts, max_new_tokens=14, output_scores=True, use_cache=False)
    for prompt, a, b in zip(prompts, cached, full):
        alone = model.generate([prompt], max_new_tokens=14, output_scores=True)[0]
        assert a.token_ids == b.token_ids == alone.token_ids
        torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.scores, alone.scores, atol=1e-5, rtol=0)
