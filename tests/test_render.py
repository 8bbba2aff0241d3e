import re

import pytest

from atlantis.data import DataConfig, DataError, Sample, Turn, load_samples
from atlantis.models import load_tokenizer
from atlantis.render import RenderConfig, Renderer

MODELS = ["llama", "llama-it", "qwen2", "qwen2-it"]


def masked_text(renderer, sample):
    """The masked tokens decoded run by run (each response is its own run); the whole sequence must decode to
    the rendered text, so the segment-wise tokenisation adds or drops no character."""
    text, _ = renderer.text_and_spans(sample)
    (r,), _ = renderer.render([sample])
    lead = 0 if (renderer.tok.bos_token and text.startswith(renderer.tok.bos_token)) else len(renderer._lead)
    assert renderer.tok.decode(r.input_ids[lead:]) == text
    runs, current = [], []
    for t, m in zip(r.input_ids, r.labels_mask):
        if m:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    assert renderer.tok.decode([t for run in runs for t in run]) == r.response_text
    return "".join(renderer.tok.decode(run) for run in runs)


def squash(s: str) -> str:
    return re.sub(r"\s+", "", s)


@pytest.mark.parametrize("name", MODELS)
def test_mask_covers_exactly_the_assistant_text(models, data_file, name):
    renderer = Renderer(load_tokenizer(models[name]), RenderConfig())
    for sample in load_samples(DataConfig(path=str(data_file))):
        strips = name == "llama-it"  # like Llama-2-chat, this template strips the content
        responses = "".join(
            sample.turns[i].content.strip() if strips else sample.turns[i].content.rstrip()
            for i in sample.response_turns
        )
        got = masked_text(renderer, sample)
        # exactly the response characters: the template's separators never join a response token
        assert got == responses, (name, sample.id, got)


@pytest.mark.parametrize(("name", "eot"), [("llama-it", "</s>"), ("qwen2-it", "<|im_end|>"), ("llama", "</s>")])
def test_end_of_turn_token_is_included_when_asked(models, data_file, name, eot):
    renderer = Renderer(load_tokenizer(models[name]), RenderConfig(include_end_of_turn=True))
    sample = load_samples(DataConfig(path=str(data_file)))[1]  # two assistant turns
    got = masked_text(renderer, sample)
    assert got.count(eot) == 2 and got.rstrip().endswith(eot)
    assert squash(got.replace(eot, "")) == squash("".join(sample.turns[i].content for i in (1, 3)))


def test_templates_differ_per_model_but_response_is_the_same(models, data_file):
    sample = load_samples(DataConfig(path=str(data_file)))[0]
    texts = {n: Renderer(load_tokenizer(models[n]), RenderConfig()).text_and_spans(sample)[0] for n in MODELS}
    assert texts["llama"].startswith("You are a helpful assistant.\n\nUser: What is two plus two?\n\nAssistant:\n")
    assert texts["llama-it"].startswith("<s>[SYS] You are a helpful assistant. [/SYS]\n[INST]")
    assert texts["qwen2-it"].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    for name, text in texts.items():
        assert "Two plus two is four." in text, name


def test_named_and_file_templates(models, data_file, tmp_path):
    tok = load_tokenizer(models["qwen2"])
    sample = load_samples(DataConfig(path=str(data_file)))[2]
    alpaca = Renderer(tok, RenderConfig(template="alpaca")).text_and_spans(sample)
    assert alpaca[0].startswith("Below is an instruction") and "### Response:hello" in alpaca[0]
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    text, spans = Renderer(tok, RenderConfig(template=str(path))).text_and_spans(sample)
    assert text == "<user>Translate 'bonjour' to English.<assistant>hello"
    assert [text[a:b] for a, b in spans] == ["hello"]
    with pytest.raises(DataError, match="unknown template"):
        Renderer(tok, RenderConfig(template="nope"))
    with pytest.raises(DataError, match="no chat_template"):
        Renderer(tok, RenderConfig(template="model"))


def test_system_turns_merged_when_template_rejects_them(models, caplog):
    tok = load_tokenizer(models["qwen2"])
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    )
    sample = Sample("s", (Turn("system", "Be brief."), Turn("user", "Hi"), Turn("assistant", "Hello")))
    text, spans = Renderer(tok, RenderConfig()).text_and_spans(sample)
    assert text == "<user>Be brief.\n\nHi<assistant>Hello"
    assert "rejects system turns" in caplog.text


def test_template_rewriting_the_response_is_an_error(models):
    tok = load_tokenizer(models["qwen2"])
    tok.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    sample = Sample("s", (Turn("user", "Hi"), Turn("assistant", "Hello")))
    with pytest.raises(DataError, match="rewrites the response text"):
        Renderer(tok, RenderConfig()).text_and_spans(sample)


def test_response_only_context(models, data_file):
    renderer = Renderer(load_tokenizer(models["llama"]), RenderConfig(context="response_only"))
    sample = load_samples(DataConfig(path=str(data_file)))[1]
    text, spans = renderer.text_and_spans(sample)
    assert text == "Waves fold into foam,\nsalt wind hums.\n\n The quick brown fox jumps over the lazy dog. "
    (r,), _ = renderer.render([sample])
    assert r.input_ids[0] == renderer.tok.bos_token_id and not r.labels_mask[0] and r.labels_mask[1]


def test_truncation_partial_flagged_full_excluded(models, data_file):
    tok = load_tokenizer(models["qwen2-it"])
    samples = load_samples(DataConfig(path=str(data_file)))
    full, _ = Renderer(tok, RenderConfig()).render(samples)
    by_id = {r.id: r for r in full}
    long = by_id["sg-multi"]
    first_resp = long.labels_mask.index(True)
    cut = first_resp + 2
    rendered, excluded = Renderer(tok, RenderConfig(max_length=cut)).render(samples)
    got = {r.id: r for r in rendered}
    assert got["sg-multi"].truncated and got["sg-multi"].n_response == 2
    assert got["sg-multi"].n_response_full == long.n_response
    assert len(got["sg-multi"]) == cut
    # samples whose response starts after the cut are excluded and reported, not scored
    gone = {e["id"] for e in excluded}
    assert gone == {r.id for r in full if r.labels_mask.index(True) >= cut}
    assert gone and all("fully truncated" in e["reason"] for e in excluded)
    assert gone.isdisjoint(got)


def test_unscorable_response_is_excluded_not_scored(models):
    """Direct scoring without BOS cannot predict the first token: a one-token response has nothing to score."""
    renderer = Renderer(load_tokenizer(models["qwen2"]), RenderConfig(context="response_only"))
    one = Sample("one", (Turn("user", "Pick a letter."), Turn("assistant", "a")))
    two = Sample("two", (Turn("user", "Pick a word."), Turn("assistant", "fox dog")))
    rendered, excluded = renderer.render([one, two])
    assert [r.id for r in rendered] == ["two"]
    assert excluded == [{"id": "one", "source": "", "reason": excluded[0]["reason"]}]
    assert "no response token can be scored" in excluded[0]["reason"]
