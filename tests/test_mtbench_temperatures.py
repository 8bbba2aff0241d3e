"""MT-Bench answers are decoded at FastChat's per-category temperatures, and temperature 0 is greedy.

The table is transcribed from upstream, not imported from `atlantis.generate`: lm-sys/FastChat
fastchat/llm_judge/common.py `temperature_config` at commit b494d0c6b4e7935f1764f8439e75da3e66beccc7 (the same
in fschat 0.2.36, the version the fschat environment installs). FastChat's gen_model_answer.py uses 0.7 for a
category not in the table, and decodes greedily when the temperature is below 1e-4 (`do_sample = False`).

Questions of every category go through the project's MT-Bench generation path: `atlantis generate` with the
settings the workflow's `answers` rule passes (`benchmarks.generate.mtbench` of the shipped profiles), once with
a recording decoder, once through the vLLM decoder with a fake engine, once with a real tiny model whose greedy
continuation is computed here with transformers' own `generate(do_sample=False)`.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_jsonl

from atlantis import config as config_lib
from atlantis.generate import GenerateConfig, VllmDecoder, generate
from atlantis.models import load_model, load_tokenizer
from atlantis.proxy import Generation, SingleModel
from atlantis.render import resolve_template

ROOT = Path(__file__).parents[1]

# lm-sys/FastChat@b494d0c6b4e7935f1764f8439e75da3e66beccc7 fastchat/llm_judge/common.py, verbatim
UPSTREAM_TEMPERATURE = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
    "arena-hard-200": 0.0,
}
UPSTREAM_OTHER = 0.7  # gen_model_answer.py: `else: temperature = 0.7`

CATEGORIES = [*UPSTREAM_TEMPERATURE, "general", None]  # a category FastChat has no entry for, and none at all


def expected(category: str | None) -> float:
    return UPSTREAM_TEMPERATURE.get(category, UPSTREAM_OTHER)


def _questions(path: Path) -> Path:
    rows = []
    for i, category in enumerate(CATEGORIES):
        q = {"question_id": 100 + i, "turns": [f"Question {i}, first turn.", f"Question {i}, second turn."]}
        rows.append(q | ({"category": category} if category else {}))
    return write_jsonl(path, rows)


def _profile_args(profile: str) -> list[str]:
    cfg = yaml.safe_load((ROOT / "config" / profile).read_text())
    return cfg.get("benchmarks", {}).get("generate", {}).get("mtbench", [])


def _workflow_config(model: str, questions: Path, out: Path, profile: str, *extra: str) -> GenerateConfig:
    """The config the `answers` rule makes: `atlantis generate model=... model_id=... questions=... out=... <extra>`."""
    args = [f"model={model}", "model_id=m", f"questions={questions}", f"out={out}", *_profile_args(profile), *extra]
    return config_lib.load(GenerateConfig, None, args)


def _category_of(messages) -> str | None:
    i = int(messages[0]["content"].split()[1].rstrip(","))
    return CATEGORIES[i]


def test_transcription_matches_installed_fschat():
    """The transcribed table is the one in the fschat environment, when it is installed."""
    found = sorted(ROOT.glob(".envs/fschat/lib/python*/site-packages/fastchat/llm_judge/common.py"))
    if not found:
        pytest.skip("no fschat environment (.envs/fschat) to compare the transcription with")
    tree = ast.parse(found[0].read_text())
    table = next(
        ast.literal_eval(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "temperature_config"
    )
    assert table == UPSTREAM_TEMPERATURE


class Recorder:
    """A decoder that answers "ok." and records the temperature each conversation was decoded at."""

    def __init__(self):
        self.seen: list[tuple[str | None, int, float]] = []

    def generate(self, prompts, *, max_new_tokens, temperature, top_p, seed, stop):
        for messages, t in zip(prompts, temperature, strict=True):
            self.seen.append((_category_of(messages), len(messages) // 2, t))
        return [Generation(text="ok.", token_ids=[1], finish_reason="eos") for _ in prompts]


@pytest.mark.parametrize("profile", ["paper.yaml", "smoke.yaml"])
def test_each_category_is_decoded_at_fastchats_temperature(models, tmp_path, profile):
    cfg = _workflow_config(models["llama-it"], _questions(tmp_path / "q.jsonl"), tmp_path / "a.jsonl", profile)
    rec = Recorder()
    generate(cfg, decoder=rec)
    assert len(rec.seen) == 2 * len(CATEGORIES)  # both turns of every question
    for category, turn, t in rec.seen:
        assert t == expected(category), (profile, category, turn, t)


class FakeParams:
    def __init__(self, **kw):
        self.kw = kw


class FakeLLM:
    def __init__(self):
        self.params: list[FakeParams] = []

    def generate(self, ids, sampling_params, use_tqdm):
        self.params += sampling_params
        out = type("Out", (), {"text": "ok.", "token_ids": [1], "stop_reason": None, "finish_reason": "stop"})
        return [type("Res", (), {"outputs": [out]}) for _ in ids]


def test_vllm_path_passes_each_category_temperature(models, tmp_path):
    """On the vLLM path the temperature goes to SamplingParams per question; vLLM reads 0 as greedy."""
    tok = load_tokenizer(models["llama-it"])
    _, template = resolve_template(tok, "auto")
    llm = FakeLLM()
    decoder = VllmDecoder(llm, FakeParams, tok, template, {tok.eos_token_id})
    questions = _questions(tmp_path / "q.jsonl")
    cfg = _workflow_config(models["llama-it"], questions, tmp_path / "a.jsonl", "paper.yaml")
    generate(cfg, decoder=decoder)
    # one engine call per turn of each batch of questions, in question order
    want = []
    for b in range(0, len(CATEGORIES), cfg.batch_size):
        want += [expected(c) for c in CATEGORIES[b : b + cfg.batch_size]] * 2
    assert [p.kw["temperature"] for p in llm.params] == want


class Capture:
    """Wraps a decoder: records each conversation's temperature and the generation it got."""

    def __init__(self, decoder):
        self.decoder, self.rows = decoder, []

    def generate(self, prompts, **kw):
        gens = self.decoder.generate(prompts, **kw)
        self.rows += [(list(p), t, g) for p, t, g in zip(prompts, kw["temperature"], gens)]
        return gens


def test_temperature_zero_is_greedy(models, tmp_path):
    """Categories at temperature 0 get transformers' greedy continuation; writing and roleplay are sampled."""
    path = models["llama-it"]
    model = load_model(path, torch.float32, torch.device("cpu"))
    single = SingleModel(model, load_tokenizer(path))
    cap = Capture(single)
    n = 6
    cfg = _workflow_config(path, _questions(tmp_path / "q.jsonl"), tmp_path / "a.jsonl", "paper.yaml")
    cfg.max_new_tokens, cfg.device = n, "cpu"
    generate(cfg, decoder=cap)
    sampled_differs = []
    for messages, t, gen in cap.rows:
        category = _category_of(messages)
        assert t == expected(category)
        prompt = torch.tensor([single.prompt_ids(messages)["model"]])
        greedy = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n, pad_token_id=0
        )[0, prompt.shape[1] :].tolist()
        if t == 0.0:
            # the same tokens up to where the answer stopped (EOS or the template's end of turn)
            assert gen.token_ids == greedy[: len(gen.token_ids)], (category, gen.token_ids, greedy)
            assert gen.finish_reason != "length" or len(gen.token_ids) == n
        elif t == 0.7:
            sampled_differs.append(gen.token_ids != greedy[: len(gen.token_ids)])
    assert any(sampled_differs)  # at 0.7 the tiny model's answers are samples, not the greedy ones
    answers = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(answers) == len(CATEGORIES)
