"""Evaluation of models larger than one GPU: sharded loading (device_map) and the optional vLLM backend.

On CPU, device_map="auto" goes through accelerate's device map (everything lands on "cpu"), so the loading path
and the decoder are the ones a multi-GPU node runs; GPU counts and memory are faked where only the planning is
tested. vLLM is not installed here: a fake `vllm` module records the arguments the backend builds.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import write_jsonl
from safetensors import safe_open

from atlantis.generate import (
    GenerateConfig,
    GenerateError,
    choose_backend,
    generate,
    placement,
    turn_seed,
)
from atlantis.models import ModelError, choose_device_map, load_model, load_tokenizer, weight_bytes
from atlantis.proxy import SingleModel
from atlantis.testing import build_tiny_model

CPU = torch.device("cpu")
GIB = 2**30
QUESTIONS = [
    {"question_id": 1, "category": "math", "turns": ["What is two plus two?", "And twelve plus thirty?"]},
    {"question_id": 2, "category": "writing", "turns": ["Write a haiku about the sea."]},
]


@pytest.fixture(scope="module")
def large_dir(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("large"), "llama", seed=5, hidden_size=96, num_layers=3))


@pytest.fixture()
def questions(tmp_path) -> Path:
    return write_jsonl(tmp_path / "question.jsonl", QUESTIONS)


def answers(out) -> dict:
    return {r["question_id"]: r["choices"][0]["turns"] for r in map(json.loads, Path(out).read_text().splitlines())}


def fake_gpus(monkeypatch, n: int, total: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=total))


# ----------------------------------------------------------------------------------------------- sizes


def test_weight_bytes_from_the_safetensors_headers(models, large_dir):
    for path in (models["llama"], models["qwen2"], large_dir):
        with safe_open(str(Path(path) / "model.safetensors"), "pt") as fh:
            numel = sum(_numel(fh, k) for k in fh.keys())  # noqa: SIM118
        assert weight_bytes(path, torch.float32) == 4 * numel
        assert weight_bytes(path, torch.bfloat16) == 2 * numel
    assert weight_bytes("owner/not-local", torch.float32) is None


def _numel(fh, key: str) -> int:
    n = 1
    for d in fh.get_slice(key).get_shape():
        n *= d
    return n


@pytest.mark.parametrize(
    "setting, n_gpus, model_gib, expected",
    [
        (None, 0, 1, None),  # CPU: one device
        (None, 1, 10, None),  # fits one GPU
        (None, 2, 10, "auto"),  # several GPUs visible: the job was given them to shard
        (None, 8, 145, "auto"),  # Qwen2-72B in bf16 over a node
        ("none", 2, 10, None),
        ("auto", 1, 10, "auto"),
        ("auto", 0, 1, "auto"),  # on CPU accelerate maps everything to host RAM
    ],
)
def test_choose_device_map(setting, n_gpus, model_gib, expected):
    assert choose_device_map(setting, n_gpus, 72 * GIB if n_gpus else None, model_gib * GIB) == expected


@pytest.mark.parametrize("setting, n_gpus", [(None, 1), ("none", 8)])
def test_a_model_larger_than_one_gpu_on_one_gpu_is_refused(setting, n_gpus):
    with pytest.raises(ModelError, match=r"145\.0 GiB\) exceed one GPU's usable memory \(72\.0 GiB\).*device_map=auto"):
        choose_device_map(setting, n_gpus, 72 * GIB, 145 * GIB)
    with pytest.raises(ModelError, match="auto, none or unset"):
        choose_device_map("balanced", n_gpus)


def test_placement_shares_the_gpus_between_the_proxy_models(models, large_dir, questions, tmp_path, monkeypatch):
    fake_gpus(monkeypatch, 2, 80 * GIB)
    base = dict(questions=str(questions), out=str(tmp_path / "a.jsonl"), gpu_memory_fraction=0.5)
    device_map, max_memory = placement(GenerateConfig(model=models["llama-it"], **base))
    assert device_map == "auto" and max_memory == {"model": {0: 40 * GIB, 1: 40 * GIB}}

    proxy = dict(large=large_dir, small=models["llama"], ref=models["llama-it"])
    device_map, max_memory = placement(GenerateConfig(**proxy, **base))
    sizes = {r: weight_bytes(p, torch.bfloat16) for r, p in proxy.items()}  # bf16: the dtype on GPU
    assert device_map == "auto" and set(max_memory) == set(proxy)
    for gpu in (0, 1):
        assert sum(m[gpu] for m in max_memory.values()) <= 40 * GIB
        for role in proxy:  # in proportion to the weights
            assert max_memory[role][gpu] == pytest.approx(40 * GIB * sizes[role] / sum(sizes.values()), abs=2)

    assert placement(GenerateConfig(model=models["llama-it"], device_map="none", **base)) == (None, None)
    fake_gpus(monkeypatch, 1, 1000)  # one GPU of 1000 bytes: the tiny model does not fit
    with pytest.raises(ModelError, match="exceed one GPU's usable memory"):
        placement(GenerateConfig(model=models["llama-it"], **base))


# ------------------------------------------------------------------------------------------- sharded path


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_device_map_auto_gives_the_same_logits(models, kind, monkeypatch):
    from transformers import AutoModelForCausalLM

    plain = load_model(models[kind], torch.float32, CPU)
    seen = []
    loader = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: seen.append(kw) or loader(*a, **kw))
    sharded = load_model(models[kind], torch.float32, CPU, device_map="auto")
    assert seen[0]["device_map"] == "auto" and seen[0]["max_memory"] is None  # accelerate's map, host RAM on CPU
    assert sharded.device == CPU and not sharded.training
    ids = load_tokenizer(models[kind])(["The quick brown fox", "Zorbs are blue"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = plain(**ids).logits, sharded(**ids).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with pytest.raises(ModelError, match="device_map must be 'auto'"):
        load_model(models[kind], torch.float32, CPU, device_map="balanced")


def test_generation_with_device_map_gives_the_same_answers(models, large_dir, questions, tmp_path):
    def run(name, **kw):
        cfg = GenerateConfig(questions=str(questions), out=str(tmp_path / f"{name}.jsonl"), max_new_tokens=8, **kw)
        return answers(generate(cfg))

    single = dict(model=models["llama-it"], model_id="m")
    assert run("s-auto", device_map="auto", **single) == run("s-none", device_map="none", **single)
    proxy = dict(large=large_dir, small=models["llama"], ref=models["llama-it"], model_id="p")
    auto = run("p-auto", device_map="auto", **proxy)
    assert auto == run("p-none", device_map="none", **proxy) and all(t for turns in auto.values() for t in turns)


# ------------------------------------------------------------------------------------------------ vLLM


class FakeLLM:
    """Records vllm.LLM's arguments; every answer is ' four ' ending at EOS."""

    instances: list[FakeLLM] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple[list, list]] = []
        FakeLLM.instances.append(self)

    def generate(self, prompts, sampling_params, use_tqdm):
        assert use_tqdm is False and len(prompts) == len(sampling_params)
        self.calls.append((prompts, sampling_params))
        done = SimpleNamespace(text=" four ", token_ids=[7, 8, 2], finish_reason="stop", stop_reason=None)
        return [SimpleNamespace(outputs=[done]) for _ in prompts]


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


@pytest.fixture()
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.instances.clear()
    return module


def test_backend_choice(models, large_dir, questions, tmp_path, monkeypatch, fake_vllm, caplog):
    base = dict(questions=str(questions), out=str(tmp_path / "a.jsonl"))
    single, proxy = dict(model=models["llama-it"]), dict(large=large_dir, small=models["llama"], ref=models["llama"])
    fake_gpus(monkeypatch, 0, 0)
    with caplog.at_level("INFO", logger="atlantis"):
        assert choose_backend(GenerateConfig(**single, **base)) == "hf"
    assert "backend hf: CUDA is not available" in caplog.text
    with pytest.raises(GenerateError, match="backend=vllm asked for, but CUDA is not available"):
        choose_backend(GenerateConfig(backend="vllm", **single, **base))
    fake_gpus(monkeypatch, 2, 80 * GIB)
    assert choose_backend(GenerateConfig(**single, **base)) == "vllm"
    assert choose_backend(GenerateConfig(backend="hf", **single, **base)) == "hf"
    assert choose_backend(GenerateConfig(**proxy, **base)) == "hf"  # proxy-tuning: always HF
    with pytest.raises(GenerateError, match="cannot proxy-tune"):
        choose_backend(GenerateConfig(backend="vllm", **proxy, **base))
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    caplog.clear()
    with caplog.at_level("INFO", logger="atlantis"):
        assert choose_backend(GenerateConfig(**single, **base)) == "hf"
    assert "backend hf: vllm is not installed" in caplog.text


def test_vllm_arguments_and_answer_format(models, questions, tmp_path, monkeypatch, fake_vllm):
    fake_gpus(monkeypatch, 2, 80 * GIB)
    path = models["qwen2-it"]
    cfg = GenerateConfig(questions=str(questions), out=str(tmp_path / "v.jsonl"), model=path, max_new_tokens=16, seed=3)
    out = generate(cfg)
    (llm,) = FakeLLM.instances
    assert llm.kwargs == {
        "model": path,
        "tokenizer": path,
        "tensor_parallel_size": 2,
        "dtype": "bfloat16",
        "seed": 3,
        "trust_remote_code": False,
        "gpu_memory_utilization": 0.9,
    }
    # The HF decoder's prompts (same template, same BOS handling) and its stop tokens.
    tok = load_tokenizer(path)
    hf = SingleModel(load_model(path, torch.float32, CPU), tok)
    (prompts1, params1), (prompts2, params2) = llm.calls  # turn 1 of both questions, then turn 2 of the first
    first = [{"role": "user", "content": q["turns"][0]} for q in QUESTIONS]
    assert prompts1 == [{"prompt_token_ids": hf.prompt_ids([m])["model"]} for m in first]
    second = [first[0], {"role": "assistant", "content": "four"}, {"role": "user", "content": QUESTIONS[0]["turns"][1]}]
    assert prompts2 == [{"prompt_token_ids": hf.prompt_ids(second)["model"]}]
    for params, qids, turn, temps in ((params1, [1, 2], 0, [0.0, 0.7]), (params2, [1], 1, [0.0])):
        assert [p.kwargs for p in params] == [
            {
                "n": 1,
                "temperature": temp,
                "top_p": 1.0,
                "max_tokens": 16,
                "seed": turn_seed(3, qid, turn),
                "stop": [],
                "stop_token_ids": sorted(hf.stop_token_ids),
                "skip_special_tokens": True,
            }
            for qid, temp in zip(qids, temps)
        ]
    assert tok.convert_tokens_to_ids("<|im_end|>") in hf.stop_token_ids
    records = [json.loads(line) for line in Path(out).read_text().splitlines()]
    assert [list(r) for r in records] == [["question_id", "answer_id", "model_id", "choices", "tstamp"]] * 2
    assert answers(out) == {1: ["four", "four"], 2: ["four"]}
