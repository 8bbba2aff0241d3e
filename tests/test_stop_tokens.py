"""Answers end at the end of the assistant turn: the chat template's end-of-turn token stops generation.

The real Llama-2-chat, Qwen2-Instruct and Gemma-2-it templates (tests/data/chat_templates) render for tiny models
whose tokenizers carry the templates' special tokens and, for Qwen2 and Gemma-2, an EOS that is not the
end-of-turn token, as on those base models. A forward hook makes the model emit the end-of-turn token as its
(K+2)-th answer token, so the real decoding loop (cache, stop checks) meets it where a fine-tuned model would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

from atlantis.generate import GenerateConfig, generate
from atlantis.models import EndOfTurn, end_of_turn, eos_token_ids, load_model, load_tokenizer
from atlantis.proxy import LogitDecoder, ProxyModel, SingleModel
from atlantis.render import NAMED_TEMPLATES
from atlantis.testing import build_tiny_model

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
CPU = torch.device("cpu")
MAX = 10
K = 3  # the end-of-turn token follows the first K + 1 answer tokens
QUESTION = "What is two plus two?"
CONV = [{"role": "user", "content": QUESTION}]

# template file -> (tiny architecture, extra special tokens, base-model EOS, end-of-turn token)
KINDS = {
    "llama-2-chat": ("llama", [], "</s>", "</s>"),
    "qwen2-instruct": ("qwen2", [], "<|endoftext|>", "<|im_end|>"),
    "gemma-2-it": ("gemma2", ["<start_of_turn>", "<end_of_turn>"], "</s>", "<end_of_turn>"),
}


def chat_model(folder: Path, name: str, seed: int, hidden_size: int = 64, template: bool = True) -> str:
    """A tiny model of `name`'s family; its tokenizer has the real template (if `template`) and its tokens."""
    kind, specials, eos, _ = KINDS[name]
    build_tiny_model(folder, kind, seed=seed, hidden_size=hidden_size)
    tok = load_tokenizer(str(folder))
    model = load_model(str(folder), torch.float32, CPU)
    if specials:
        tok.add_special_tokens({"additional_special_tokens": specials})
        model.resize_token_embeddings(len(tok))
    tok.eos_token = eos  # Qwen2 base: <|endoftext|>, not the instruct template's <|im_end|>
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    tok.chat_template = (TEMPLATES / f"{name}.jinja").read_text() if template else None
    tok.save_pretrained(folder)
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module", params=sorted(KINDS))
def family(request, tmp_path_factory):
    """name, and the three models of a proxy: large (base), small (base) and ref (instruct, real template)."""
    root = tmp_path_factory.mktemp(request.param)
    paths = {
        "large": chat_model(root / "large", request.param, seed=5, hidden_size=96, template=False),
        "small": chat_model(root / "small", request.param, seed=1, template=False),
        "ref": chat_model(root / "ref", request.param, seed=2),
    }
    return request.param, paths


def eot_id(name: str, tok) -> int:
    return tok.convert_tokens_to_ids(KINDS[name][3])


def emit_at(model, position: int, token: int):
    """Make `model` put `token` first after reading the token at `position` (a hook on its real forward)."""

    def hook(_module, _args, kwargs, output):
        last = kwargs["position_ids"][:, -1]
        output.logits[:, -1, token] = torch.where(last == position, 1e4, output.logits[:, -1, token])

    return model.register_forward_hook(hook, with_kwargs=True)


def answer_position(decoder: LogitDecoder, role: str) -> int:
    """Position of answer token K in `role`'s stream (prompt tokens first, no padding for one prompt)."""
    return len(decoder.prompt_ids(CONV)[role]) + K


def check_stops_at_end_of_turn(decoder: LogitDecoder, hooked_model, role: str, name: str) -> str:
    """The answer is the K + 1 tokens before the end-of-turn token, which ends it and is not in its text."""
    tok = decoder.tokenizer
    eot = eot_id(name, tok)
    assert eot in decoder.stop_token_ids
    free = decoder.generate([CONV], max_new_tokens=MAX)[0]
    assert free.finish_reason == "length" and eot not in free.token_ids
    handle = emit_at(hooked_model, answer_position(decoder, role), eot)
    try:
        gen = decoder.generate([CONV], max_new_tokens=MAX)[0]
    finally:
        handle.remove()
    assert gen.token_ids == free.token_ids[: K + 1] + [eot]
    assert gen.finish_reason == "eos" and len(gen.token_ids) < MAX
    expected = tok.decode(free.token_ids[: K + 1], skip_special_tokens=True)
    assert gen.text == expected and KINDS[name][3] not in gen.text
    return expected


def test_end_of_turn_of_the_real_templates(family):
    name, paths = family
    tok = load_tokenizer(paths["ref"])
    eot = end_of_turn(tok, tok.chat_template)
    assert eot == EndOfTurn(KINDS[name][3], (eot_id(name, tok),))
    if name != "llama-2-chat":  # the point of the fix: for Qwen2 and Gemma-2 it is not the base model's EOS
        base = load_model(paths["large"], torch.float32, CPU)
        assert eot_id(name, tok) not in eos_token_ids(tok, base.generation_config)


def test_named_and_plain_text_markers(models, tmp_path):
    tok = load_tokenizer(models["llama"])
    assert end_of_turn(tok, NAMED_TEMPLATES["plain"]) == EndOfTurn("</s>", (tok.eos_token_id,))
    assert end_of_turn(tok, NAMED_TEMPLATES["chatml"]).stop_string == "<|im_end|>"  # not a token of this vocabulary
    marked = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n### End\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    assert end_of_turn(tok, marked) == EndOfTurn("### End", ())
    (tmp_path / "marked.jinja").write_text(marked)
    decoder = SingleModel(load_model(models["llama"], torch.float32, CPU), tok, template=str(tmp_path / "marked.jinja"))
    assert decoder.stop_strings == ("### End",) and decoder.stop_token_ids == {tok.eos_token_id}


def test_single_model_stops_at_end_of_turn(family, tmp_path, caplog):
    name, paths = family
    model = load_model(paths["ref"], torch.float32, CPU)
    tok = load_tokenizer(paths["ref"])
    with caplog.at_level("INFO", logger="atlantis"):
        decoder = SingleModel(model, tok)
    assert sum("generation stops at" in r.message and KINDS[name][3] in r.message for r in caplog.records) == 1
    expected = check_stops_at_end_of_turn(decoder, model, "model", name)

    # `atlantis generate` writes the answer cut at the end of the turn
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "category": "math", "turns": [QUESTION]}])
    eot = eot_id(name, tok)
    handle = emit_at(model, answer_position(decoder, "model"), eot)
    try:
        cfg = GenerateConfig(
            questions=str(questions), out=str(tmp_path / "a.jsonl"), model=paths["ref"], max_new_tokens=MAX
        )
        out = generate(cfg, decoder=decoder)
    finally:
        handle.remove()
    (record,) = [json.loads(line) for line in Path(out).read_text().splitlines()]
    assert record["choices"][0]["turns"] == [expected.strip()]

    if name != "llama-2-chat":  # without the template's end of turn (plain: EOS only) the answer runs on
        plain = SingleModel(model, tok, template="plain")
        handle = emit_at(model, answer_position(plain, "model"), eot)
        try:
            gen = plain.generate([CONV], max_new_tokens=MAX)[0]
        finally:
            handle.remove()
        assert eot not in plain.stop_token_ids and gen.finish_reason == "length"


def test_proxy_stops_at_end_of_turn(family):
    name, paths = family
    mods = {role: load_model(p, torch.float32, CPU) for role, p in paths.items()}
    toks = {role: load_tokenizer(p) for role, p in paths.items()}
    proxy = ProxyModel(mods["large"], mods["small"], mods["ref"], toks, alpha=1.0)
    assert all(c.template == toks["ref"].chat_template for c in proxy.components)  # the large model's template too
    check_stops_at_end_of_turn(proxy, mods["large"], "large", name)  # s_L + (s_r - s_S): the large model emits it
