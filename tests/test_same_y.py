"""One y per sample, whatever the template: p_S (the `plain` template every base model reads) and p_r (a chat
template) score the same response string and, with one tokenizer, the same tokens (issue 11).

Real tokenizers that install offline (SmolLM2's byte-level BPE and Gemma-3's SentencePiece, from their GGUF
packages), the real Llama-2-chat, Qwen2-Instruct and Gemma-2-it templates (tests/data/chat_templates/) and SmolLM2's
own ChatML, on 40 real ShareGPT conversations.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from atlantis.assets import sharegpt_conversations, tokenizer
from atlantis.data import Sample, Turn
from atlantis.render import RenderConfig, Renderer

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
STRIPPING = {"llama-2-chat", "gemma-2-it"}  # these templates strip the response text


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "gemma3-270m"])
def tok(request):
    return tokenizer(request.param)


def samples(records) -> list[Sample]:
    return [Sample(r["id"], tuple(Turn(ROLES[t["from"]], t["value"]) for t in r["conversations"])) for r in records]


@pytest.fixture(scope="module")
def conversations() -> list[Sample]:
    """40 conversations that open with the user, as OpenHermes-2.5's do (Llama-2-chat's template requires it)."""
    return samples(sharegpt_conversations(40, seed=0, human_first=True))


@pytest.fixture(scope="module")
def openers() -> list[Sample]:
    """ShareGPT chunks that open with the assistant: `plain` gives that turn its own header."""
    return [s for s in samples(sharegpt_conversations(120, seed=1)) if s.turns[0].role == "assistant"]


def rendered(tok, template: str, samples, **kw):
    r, excluded = Renderer(tok, RenderConfig(template=template, max_length=100_000, **kw)).render(samples)
    assert not excluded
    return {x.id: x for x in r}


def scored_ids(r):
    return [t for t, m in zip(r.input_ids, r.labels_mask) if m]


@pytest.mark.parametrize("chat", ["model", "llama-2-chat", "qwen2-instruct", "gemma-2-it"])
def test_base_and_chat_templates_score_the_same_y(tok, conversations, chat):
    if chat == "model" and not tok.chat_template:
        pytest.skip("Gemma-3-270M (base) ships no chat template")
    template = "model" if chat == "model" else str(TEMPLATES / f"{chat}.jinja")
    base = rendered(tok, "plain", conversations)
    instruct = rendered(tok, template, conversations)
    same = 0
    for s in conversations:
        a, b = base[s.id], instruct[s.id]
        responses = [s.turns[i].content for i in s.response_turns]
        if chat in STRIPPING and any(c != c.lstrip() for c in responses):
            # another string, which the hash shows: the weights step excludes such a sample by name
            assert a.response_text != b.response_text, s.id
            continue
        assert a.response_text == b.response_text, s.id
        assert scored_ids(a) == scored_ids(b), s.id  # one tokenizer: the very same tokens
        same += 1
    assert same >= 35  # nearly every real response has no leading whitespace


def test_a_conversation_opening_with_the_assistant_scores_all_of_y(tok, openers):
    if not tok.chat_template:
        pytest.skip("Gemma-3-270M (base) ships no chat template")
    assert len(openers) >= 10
    base, instruct = rendered(tok, "plain", openers), rendered(tok, "model", openers)
    for s in openers:
        assert base[s.id].response_text == instruct[s.id].response_text, s.id
        assert scored_ids(base[s.id]) == scored_ids(instruct[s.id]), s.id


def test_scored_text_is_the_response_itself(tok, conversations):
    """The scored tokens decode to the responses (trailing whitespace left to the template), not to a template
    separator joined with the first word."""
    base = rendered(tok, "plain", conversations)
    for s in conversations:
        text = base[s.id].response_text
        for i in s.response_turns:
            assert s.turns[i].content.rstrip() in text or not s.turns[i].content.strip()
        assert not text.startswith("\n") or s.turns[s.response_turns[0]].content.startswith("\n")


def llama_legacy_like_tokenizer():
    """A small BPE with Llama-2's legacy normaliser (a `▁` prefixed to every encoded string) and byte fallback:
    the dummy-prefix behaviour of Llama-2's tokenizer, which cannot be installed offline."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "Hello there, how are you?",
        "User: hi\n\nAssistant:\nok.",
    ]
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?!:\n[]/<>▁")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet)
    tok.train_from_iterator(corpus * 50, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_a_dummy_prefix_tokenizer_scores_the_same_tokens():
    """With a tokenizer that prefixes `▁` to every string it encodes, each segment after the first is encoded
    behind a sentinel (a newline; another where the newline merges with the segment, as `\\n\\n` does here): the
    response's tokens are the same under `plain` and Llama-2-chat, and the whole text decodes unchanged."""
    tok = llama_legacy_like_tokenizer()
    assert Renderer(tok, RenderConfig(template="plain"))._dummy_prefix
    convo = [
        Sample("a", (Turn("user", "What is two plus two?"), Turn("assistant", "Four, the quick fox."))),
        Sample(
            "b", (Turn("user", "Hi"), Turn("assistant", "Hello there."), Turn("user", "And?"), Turn("assistant", "Ok."))
        ),
    ]
    base = rendered(tok, "plain", convo)
    chat = rendered(tok, str(TEMPLATES / "llama-2-chat.jinja"), convo)
    for s in convo:
        assert (
            base[s.id].response_text
            == chat[s.id].response_text
            == "".join(s.turns[i].content for i in s.response_turns)
        )
        assert scored_ids(base[s.id]) == scored_ids(chat[s.id])
        assert "▁" not in tok.convert_ids_to_tokens(scored_ids(base[s.id])[:1])[0]  # no dummy space joined to y
