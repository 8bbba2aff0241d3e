"""The tiny world's model families: tokenizers, architectures, pre-training and reference tuning.

Two families with different transformers architectures and different tokenizers, as the paper's Llama-2,
Qwen2 and Gemma2 families differ (Table 1; ATLANTIS-cross, Table 4, and Fig. 4 need two):

- ``lumi``: LlamaForCausalLM, byte-level BPE with single digits and a ``<s>`` BOS;
- ``quen``: Qwen2ForCausalLM (tied embeddings), another byte-level BPE (larger vocabulary, no BOS).

Each family has a small base p_S and a large base p_L, both pre-trained on the world's corpus, and a
reference p_r: p_S tuned on the curated set (the vendors' instruct tuning). ``lumi`` also has an ``xl`` size
for the scale experiment (Table 5). Models are saved like Hub checkpoints (config.json, model.safetensors,
tokenizer, and a chat template on the instruct models) and are read back with ``from_pretrained``.

The chat format is the world's question/answer line (``Q: zorb color? blue.`` + EOS): pre-training text uses
the same sentence form with a source tag (tiny-world findings, lesson 1), so SFT can reach pre-trained
knowledge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from atlantis.config import field
from atlantis.log import get_logger

log = get_logger(__name__)

# The world's chat template: user content, then the assistant's content and EOS. Instruct models carry it as
# their chat_template; base models have none and are rendered with this file (`render.template=<path>`).
QA_TEMPLATE = (
    "{{ bos_token or '' }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
TEMPLATE_PATH = Path(__file__).with_name("qa.jinja")

FAMILIES: dict[str, dict] = {
    "lumi": {
        "arch": "llama",
        "vocab_size": 384,
        "sizes": {
            "small": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 192},
            "large": {"hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 384},
            "xl": {"hidden_size": 192, "num_hidden_layers": 6, "intermediate_size": 576},
        },
    },
    "quen": {
        "arch": "qwen2",
        "vocab_size": 512,
        "sizes": {
            "small": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 192},
            "large": {"hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 384},
        },
    },
}


@dataclass
class PretrainConfig:
    epochs: int = field(40, help="Passes over the corpus.")
    batch_size: int = field(64, help="Lines per step.")
    learning_rate: float = field(3e-3, help="Peak AdamW learning rate (linear warm-up, cosine decay).")
    warmup_steps: int = field(50, help="Warm-up steps.")
    weight_decay: float = field(0.01, help="AdamW weight decay.")
    seed: int = field(0, help="Initialisation and data-order seed.")

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError("pretrain: epochs >= 0, batch_size >= 1 and learning_rate > 0 are required")


def build_tokenizer(family: str, texts: list[str]):
    """A byte-level BPE trained on the world's corpus (deterministic for the same texts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    # Digits one by one so sums are learnable digit-wise; the families differ in vocabulary and specials.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>"] if spec["arch"] == "llama" else ["<|endoftext|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=spec["vocab_size"],
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    if spec["arch"] == "llama":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_model(family: str, size: str, tokenizer, seed: int):
    """A freshly initialised model of the family's architecture (deterministic for the seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = FAMILIES[family]
    dims = spec["sizes"][size]
    common = dict(
        vocab_size=len(tokenizer),
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **dims,
    )
    torch.manual_seed(seed)
    if spec["arch"] == "llama":
        return LlamaForCausalLM(LlamaConfig(bos_token_id=tokenizer.bos_token_id, **common))
    return Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common))


def pretrain(model, tokenizer, lines: list[str], cfg: PretrainConfig) -> list[float]:
    """Next-token training on corpus lines (one line = one document, EOS-terminated); returns epoch losses."""
    enc = tokenizer([line + tokenizer.eos_token for line in lines], add_special_tokens=True)["input_ids"]
    width = max(len(x) for x in enc)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, x in enumerate(enc):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    steps = cfg.epochs * math.ceil(len(enc) / cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    losses = []
    for _ in range(cfg.epochs):
        order = torch.randperm(len(enc), generator=gen)
        total, count = 0.0, 0
        for start in range(0, len(enc), cfg.batch_size):
            b = order[start : start + cfg.batch_size]
            n = int(mask[b].sum(0).nonzero().max()) + 1  # trim the batch to its longest line
            out = model(input_ids=ids[b, :n], attention_mask=mask[b, :n], labels=labels[b, :n])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            total += out.loss.item() * len(b)
            count += len(b)
        losses.append(total / count)
    model.eval()
    return losses


def save(model, tokenizer, folder: Path, instruct: bool) -> Path:
    """Save like a Hub checkpoint; instruct models carry the world's chat template."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.chat_template = QA_TEMPLATE if instruct else None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
