"""Tiny models built from config for tests, examples and benchmarks; nothing is downloaded.

Two families with different architectures and different tokenizers, saved like Hub checkpoints
(config.json, model.safetensors, tokenizer files) and loaded back through the same `from_pretrained`
path that real models use:

- ``llama``: LlamaForCausalLM, byte-level BPE that prepends ``<s>``; the base model has no chat template
  (so it gets the named ``plain`` template), the instruct sibling has a Llama-2 style ``[INST]`` template
  that strips the content, as Llama-2-chat's does;
- ``qwen2``: Qwen2ForCausalLM, a different BPE without BOS; the instruct sibling has a ChatML template;
- ``gemma2``: Gemma2ForCausalLM on the llama tokenizer, for its final-logit soft-capping and sliding window.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# One record of every accepted format, multi-turn and Unicode included.
SAMPLES = [
    {
        "id": "sg-1",
        "conversations": [
            {"from": "system", "value": "You are a helpful assistant."},
            {"from": "human", "value": "What is two plus two?"},
            {"from": "gpt", "value": "Two plus two is four."},
        ],
    },
    {
        "id": "sg-multi",
        "conversations": [
            {"from": "human", "value": "Write a haiku about the sea."},
            {"from": "gpt", "value": "Waves fold into foam,\nsalt wind hums."},
            {"from": "human", "value": "Now one about a fox."},
            {"from": "gpt", "value": " The quick brown fox jumps over the lazy dog. "},
        ],
    },
    {
        "id": "msg-1",
        "messages": [
            {"role": "user", "content": "Translate 'bonjour' to English."},
            {"role": "assistant", "content": "hello"},
        ],
    },
    {"instruction": "Add two numbers in Python.", "input": "", "output": "def add(a, b):\n    return a + b"},
    {"instruction": "Translate", "input": "café, naïve, 東京", "output": "Unicode: café, naïve, Tokyo."},
    {"prompt": "Zorbs are", "completion": " blue; florps are green; 12 + 30 = 42."},
]


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "User: What is two plus two?\n\nAssistant: Two plus two is four.",
    "Write a haiku about the sea. Waves fold into foam, salt wind hums.",
    "def add(a, b):\n    return a + b",
    "Zorbs are blue; florps are green; 12 + 30 = 42.",
    "Translate 'bonjour' to English: hello. Unicode: café, naïve, 東京.",
    "You are a helpful assistant. Answer briefly and correctly.",
]

LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ '[SYS] ' + m['content'] | trim + ' [/SYS]\n' }}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _tokenizer(kind: str, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if kind == "llama":
        specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size if kind == "llama" else vocab_size + 64,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    if kind == "llama":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def build_tiny_model(
    folder: str | Path,
    kind: str = "llama",
    instruct: bool = False,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
) -> Path:
    """Build, save and return a tiny causal LM folder (random weights, deterministic for a seed)."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    folder = Path(folder)
    tok = _tokenizer("qwen2" if kind == "qwen2" else "llama")
    if instruct:
        tok.chat_template = LLAMA2_TEMPLATE if kind == "llama" else CHATML_TEMPLATE
    common = dict(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(bos_token_id=tok.bos_token_id, **common))
    elif kind == "gemma2":
        model = Gemma2ForCausalLM(
            Gemma2Config(
                bos_token_id=tok.bos_token_id,
                head_dim=hidden_size // 4,
                final_logit_softcapping=3.0,
                sliding_window=8,
                **common,
            )
        )
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common))
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


DEMO_QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a haiku about the sea.", "Now one about a fox."]},
    {"question_id": 2, "category": "math", "turns": ["What is two plus two?", "And twelve plus thirty?"]},
]


def build_demo(root: str | Path) -> Path:
    """The README's example world: two tiny families (base + instruct), a larger llama as p_L, SFT data and
    MT-Bench-style questions."""
    root = Path(root)
    for kind in ("llama", "qwen2"):
        build_tiny_model(root / "models" / kind, kind, instruct=False, seed=1)
        build_tiny_model(root / "models" / f"{kind}-it", kind, instruct=True, seed=2)
    build_tiny_model(root / "models" / "llama-large", "llama", seed=5, hidden_size=96, num_layers=3)
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "sft.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in SAMPLES))
    (root / "data" / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in DEMO_QUESTIONS))
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build the tiny demo models and data used by the README.")
    parser.add_argument("root", help="Folder to write models/ and data/ into.")
    build_demo(parser.parse_args().root)
