"""Proxy-tuning: decode from s_L + α (s_r − s_S), the next-token logits of three causal LMs (paper Eq. 9).

Proxy-tuning (Liu et al., 2024) shifts a large base model p_b^L by the change that fine-tuning made to a small
model: with p_b^S the small base model and p_r its fine-tuned (reference) version,

    p*(y_t | x, y_<t) = softmax( s_b^L + α (s_r − s_b^S) )      (paper §2.3 Eq. 9, α = 1 there)

ATLANTIS rests on the same assumption (the distribution change is transferable from small to large models) but
uses the ratio p_r / p_b^S as a sample weight instead; Appendix B / Table 7 compares the two on TruthfulQA
(MC1/MC2, which needs `continuation_logprobs`) and MT-Bench (which needs `generate`).

How it is computed:

- each model keeps its own KV cache (`DynamicCache`), its own left-padded prompt, attention mask and position
  ids, so every decoding step is one single-token forward per model; the three prompts may even differ (a base
  model may read a plain prompt while the reference reads its chat template, as in Liu et al.'s code);
- the sampled token is appended to all three streams; rows that finish (EOS, a stop string, the length limit)
  are dropped from every batch and cache, so long answers do not make short ones pay;
- sampling draws from a CPU generator per prompt, seeded per prompt, so a prompt's sample does not depend on
  which other prompts share its batch, nor on the device.

`SingleModel` is the same decoder over one model (weight 1): `atlantis generate` uses it for a plain model, so
both paths share the batching code that the tests check.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jinja2 import TemplateError

from atlantis.data import DataError
from atlantis.log import get_logger
from atlantis.models import (
    ModelError,
    end_of_turn,
    eos_token_ids,
    load_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
)
from atlantis.render import resolve_template

log = get_logger(__name__)

ROLES = ("large", "small", "ref")
GREEDY_BELOW = 1e-4  # temperatures below this decode greedily (FastChat: do_sample = temperature >= 1e-4)

Message = Mapping[str, str]
Prompt = str | Sequence[Message]  # raw text (fed as is), or chat messages (rendered with each model's template)


class VocabularyMismatchError(ValueError):
    """The models do not share one vocabulary, so their logits cannot be added token by token (Eq. 9)."""


@dataclass(frozen=True)
class Component:
    """One model in the mixture: its weights, tokenizer and the chat template (jinja source) of its prompts."""

    name: str
    model: Any
    tokenizer: Any
    template: str


@dataclass
class Generation:
    """One decoded continuation. `scores[t]` are the combined logits that chose `token_ids[t]`."""

    text: str
    token_ids: list[int]
    finish_reason: Literal["eos", "stop", "length"]
    scores: torch.Tensor | None = None  # [len(token_ids), vocab], only with output_scores=True


@dataclass
class Continuation:
    """Log-likelihood of one continuation given a context, token by token, under the combined distribution."""

    token_ids: list[int]
    logprobs: list[float]
    is_greedy: bool  # every token is the argmax of the combined logits (lm-eval's `is_greedy`)

    @property
    def total(self) -> float:
        return math.fsum(self.logprobs)


# ------------------------------------------------------------------------------------------ vocabularies


def head_size(model) -> int:
    """Rows of the LM head (may exceed len(tokenizer): checkpoints pad it to a multiple of 64/128)."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(cfg.vocab_size)


def check_vocabularies(models: Mapping[str, Any], tokenizers: Mapping[str, Any]) -> int:
    """Return the shared vocabulary size V, or raise `VocabularyMismatchError` naming what differs.

    Eq. 9 adds logits index by index, which is meaningful only when index i is the same token in every model:
    the tokenizers' token->id mappings must be identical. LM heads may still differ in size, because checkpoints
    pad the embedding matrix beyond len(tokenizer) (Qwen2-7B has 152064 rows, Qwen2-0.5B 151936, for 151646
    tokens: the very pair of Table 7). The padded rows are ids no tokenizer can produce or decode, so the
    logits are truncated to the first V = len(tokenizer) entries; that is done only once the tokenizers are
    known to be identical.
    """
    names = list(tokenizers)
    first = names[0]
    vocab = tokenizers[first].get_vocab()
    for name in names[1:]:
        other = tokenizers[name].get_vocab()
        if other != vocab:
            only_first = sorted(set(vocab) - set(other))[:5]
            only_other = sorted(set(other) - set(vocab))[:5]
            moved = sorted(t for t in set(vocab) & set(other) if vocab[t] != other[t])[:5]
            raise VocabularyMismatchError(
                f"the {first} and {name} models have different vocabularies ({len(vocab)} vs {len(other)} "
                f"tokens; only in {first}: {only_first}, only in {name}: {only_other}, different ids: {moved}); "
                "proxy-tuning adds logits token by token (Eq. 9) and needs models sharing one tokenizer"
            )
    size = len(tokenizers[first])
    heads = {name: head_size(m) for name, m in models.items()}
    small = {name: h for name, h in heads.items() if h < size}
    if small:
        raise VocabularyMismatchError(
            f"LM head(s) {small} have fewer rows than the tokenizer's {size} tokens; the models do not match it"
        )
    if any(h != size for h in heads.values()):
        log.info("LM heads %s are padded beyond the %d tokenizer tokens: using the first %d logits", heads, size, size)
    return size


# --------------------------------------------------------------------------------------------- sampling


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every token outside the smallest most-likely set whose probability reaches `top_p`."""
    if top_p >= 1.0:
        return logits
    ordered, order = logits.sort(dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens; the top token has 0
    drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, before >= top_p)
    return logits.masked_fill(drop, float("-inf"))


def pick_tokens(
    logits: torch.Tensor,
    temperature: Sequence[float],
    top_p: float,
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Next token per row: argmax below GREEDY_BELOW, else a temperature/top-p sample from the row's generator.

    Sampling runs on CPU in float32 with a CPU generator, so a seed gives the same tokens on any device.
    """
    tokens = logits.argmax(dim=-1).cpu()
    for j, temp in enumerate(temperature):
        if temp < GREEDY_BELOW:
            continue
        row = top_p_filter(logits[j].float().cpu() / temp, top_p)
        tokens[j] = torch.multinomial(row.softmax(dim=-1), 1, generator=generators[j])[0]
    return tokens


def _generators(seed: int | Sequence[int] | None, n: int) -> list[torch.Generator]:
    if seed is None:
        seeds = torch.randint(0, 2**62, (n,)).tolist()  # from the global RNG: torch.manual_seed still applies
    elif isinstance(seed, int):
        seeds = [seed + i for i in range(n)]
    else:
        seeds = list(seed)
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} prompts")
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt; a template that writes BOS itself gets no second one (as render.py does)."""
    add_special = not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


# ----------------------------------------------------------------------------------------------- streams


def _accepts(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _cache_kwarg(model) -> str:
    # transformers 5.x renamed `past_key_values` to `cache` (the old name is a deprecated alias until 5.40).
    return "cache" if _accepts(model, "cache") else "past_key_values"


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # Left padding: a row's first real token is position 0, whatever its padding (as HF generate does).
    return (mask.cumsum(dim=-1) - 1).clamp(min=0)


class _Stream:
    """One model's view of a batch: left-padded ids, attention mask, and its own KV cache.

    `ids` holds everything fed or to be fed; `fed` counts the columns already in the cache. With the cache, each
    call runs only the new columns (the prompt first, then one token per step); without it, each call
    recomputes the whole prefix (the slow reference path the tests compare against).
    """

    def __init__(self, comp: Component, prompts: Sequence[Sequence[int]], vocab: int, use_cache: bool):
        from transformers import DynamicCache

        self.model = comp.model
        self.vocab = vocab
        device = comp.model.device
        tok = comp.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        width = max(len(p) for p in prompts)
        self.ids = torch.full((len(prompts), width), pad if pad is not None else 0, dtype=torch.long)
        self.mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            if p:
                self.ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                self.mask[i, width - len(p) :] = 1
        self.ids, self.mask = self.ids.to(device), self.mask.to(device)
        self.cache = DynamicCache(config=comp.model.config) if use_cache else None
        self.fed = 0
        self._cache_name = _cache_kwarg(comp.model)
        self._keep = {"logits_to_keep": 1} if _accepts(comp.model, "logits_to_keep") else {}

    def next_logits(self) -> torch.Tensor:
        """float32 next-token logits [rows, vocab] after everything in `ids`."""
        if self.cache is not None:
            out = self.model(
                input_ids=self.ids[:, self.fed :],
                attention_mask=self.mask,  # the whole row: cached columns and new ones
                position_ids=_positions(self.mask)[:, self.fed :],
                use_cache=True,
                **{self._cache_name: self.cache},
                **self._keep,
            )
        else:
            out = self.model(
                input_ids=self.ids,
                attention_mask=self.mask,
                position_ids=_positions(self.mask),
                use_cache=False,
                **self._keep,
            )
        self.fed = self.ids.shape[1]
        return out.logits[:, -1, : self.vocab].float()

    def append(self, tokens: torch.Tensor) -> None:
        tokens = tokens.to(self.ids.device)
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)[:, None]], dim=1)

    def keep_rows(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.ids.device)
        self.ids, self.mask = self.ids[rows], self.mask[rows]
        if self.cache is not None:
            # CPU indices: a sharded model's cache layers live on several GPUs, which a CUDA index cannot all reach
            self.cache.batch_select_indices(rows.cpu())


# ----------------------------------------------------------------------------------------------- decoder


class LogitDecoder:
    """Batched decoding and scoring from a fixed combination of several causal LMs' next-token logits."""

    def __init__(self, components: Sequence[Component], primary: str, vocab_size: int):
        self.components = tuple(components)
        self.primary = next(c for c in self.components if c.name == primary)
        self.vocab_size = vocab_size
        self.stop_token_ids, self.stop_strings = self._stops()
        log.info(
            "generation stops at %s%s",
            ", ".join(f"{self.tokenizer.convert_ids_to_tokens(i)!r} ({i})" for i in sorted(self.stop_token_ids)),
            f" and the text {self.stop_strings}" if self.stop_strings else "",
        )

    @property
    def tokenizer(self):
        """The tokenizer that decodes generated tokens (the reference model's for a proxy)."""
        return self.primary.tokenizer

    def combine(self, logits: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Combined next-token logits from each component's logits (same shape)."""
        raise NotImplementedError

    def _stops(self) -> tuple[set[int], tuple[str, ...]]:
        """Every model's EOS ids, and the end-of-turn marker of every model's chat template.

        A base model fine-tuned on a chat template ends its turn with the template's end-of-turn token, which
        for Qwen2 (`<|im_end|>`) and Gemma-2 (`<end_of_turn>`) is not the base model's EOS: without it every
        answer would run on to max_new_tokens. A marker that is plain text becomes a stop string.
        """
        ids: set[int] = set()
        strings: list[str] = []
        for c in self.components:
            ids |= eos_token_ids(c.tokenizer, getattr(c.model, "generation_config", None))
            try:
                eot = end_of_turn(c.tokenizer, c.template)
            except ModelError as err:  # such a template cannot render answers; scoring raw text still works
                log.warning("the %s model's template: %s; stopping at EOS only", c.name, err)
                continue
            ids.update(eot.token_ids)
            if eot.stop_string and eot.stop_string not in strings:
                strings.append(eot.stop_string)
        return {i for i in ids if i < self.vocab_size}, tuple(strings)

    # -- prompts ---------------------------------------------------------------------------------------
    def render(self, messages: Sequence[Message]) -> dict[str, str]:
        """Each model's prompt text for a conversation, ending with the assistant's generation prompt."""
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        texts = {}
        for c in self.components:
            try:
                texts[c.name] = c.tokenizer.apply_chat_template(
                    msgs, chat_template=c.template, tokenize=False, add_generation_prompt=True
                )
            except TemplateError as err:  # e.g. Gemma's "System role not supported"
                raise DataError(
                    f"the chat template of the {c.name} model cannot render this conversation: {err}"
                ) from err
        return texts

    def _texts(self, prompt: Prompt) -> dict[str, str]:
        return {c.name: prompt for c in self.components} if isinstance(prompt, str) else self.render(prompt)

    @staticmethod
    def _encode(comp: Component, text: str) -> list[int]:
        return encode_prompt(comp.tokenizer, text)

    def prompt_ids(self, prompt: Prompt) -> dict[str, list[int]]:
        """Token ids of a prompt for each model: raw text as is, chat messages through each model's template."""
        texts = self._texts(prompt)
        return {c.name: self._encode(c, texts[c.name]) for c in self.components}

    # -- generation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int = 256,
        temperature: float | Sequence[float] = 0.0,
        top_p: float = 1.0,
        seed: int | Sequence[int] | None = None,
        stop: Sequence[str] = (),
        use_cache: bool = True,
        output_scores: bool = False,
    ) -> list[Generation]:
        """Decode every prompt (batched, left-padded). See `generate_ids` for the arguments."""
        return self.generate_ids(
            [self.prompt_ids(p) for p in prompts],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            use_cache=use_cache,
            output_scores=output_scores,
        )

    @torch.no_grad()
    def generate_ids(
        self,
        prompts: Sequence[Mapping[str, Sequence[int]]],
        *,
        max_new_tokens: int = 256,
        temperature: float | Sequence[float] = 0.0,
        top_p: float = 1.0,
        seed: int | Sequence[int] | None = None,
        stop: Sequence[str] = (),
        use_cache: bool = True,
        output_scores: bool = False,
    ) -> list[Generation]:
        """Decode from per-model prompt ids, all prompts in one batch.

        temperature: one value or one per prompt; below 1e-4 decodes greedily. top_p: nucleus sampling.
        seed: an int gives prompt i the seed `seed + i`; a sequence gives each prompt its own (then a prompt's
        sample does not depend on its batch); None draws seeds from torch's global RNG.
        stop: strings that end a continuation (it is cut before them); EOS ids of every model and the end-of-turn
        marker of every model's chat template (`stop_token_ids`, `stop_strings`) also stop it.
        use_cache=False recomputes the full prefix at every step (a slow reference for tests).
        output_scores keeps the combined logits of every step in `Generation.scores`.
        """
        n = len(prompts)
        if n == 0:
            return []
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        temps = [float(temperature)] * n if isinstance(temperature, (int, float)) else [float(t) for t in temperature]
        if len(temps) != n:
            raise ValueError(f"got {len(temps)} temperatures for {n} prompts")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        for i, p in enumerate(prompts):
            if any(len(p[c.name]) == 0 for c in self.components):
                raise ValueError(f"prompt {i} is empty for some model; there is nothing to condition on")
        gens = _generators(seed, n)
        streams = {
            c.name: _Stream(c, [p[c.name] for p in prompts], self.vocab_size, use_cache) for c in self.components
        }
        device = self.primary.model.device
        stop = [s for s in (*stop, *self.stop_strings) if s]
        tail = max((len(s) for s in stop), default=0) + 8  # tokens enough to hold any stop string

        tokens: list[list[int]] = [[] for _ in range(n)]
        scores: list[list[torch.Tensor]] = [[] for _ in range(n)]
        finish: list[str] = ["length"] * n
        active = list(range(n))  # prompt index of each live row of the streams
        for _ in range(max_new_tokens):
            logits = self.combine({name: s.next_logits().to(device) for name, s in streams.items()})
            picked = pick_tokens(logits, [temps[i] for i in active], top_p, [gens[i] for i in active])
            keep = []
            for j, i in enumerate(active):
                tok = int(picked[j])
                tokens[i].append(tok)
                if output_scores:
                    scores[i].append(logits[j].cpu())
                if tok in self.stop_token_ids:
                    finish[i] = "eos"
                elif stop and any(s in self.tokenizer.decode(tokens[i][-tail:]) for s in stop):
                    finish[i] = "stop"
                elif len(tokens[i]) < max_new_tokens:
                    keep.append(j)
            if not keep:
                break
            if len(keep) < len(active):  # drop finished rows from every model's batch and cache
                rows = torch.tensor(keep, dtype=torch.long)
                for s in streams.values():
                    s.keep_rows(rows)
                picked = picked[rows]
                active = [active[j] for j in keep]
            for s in streams.values():
                s.append(picked)
        return [
            Generation(
                text=self._text(tokens[i], finish[i], stop),
                token_ids=tokens[i],
                finish_reason=finish[i],  # type: ignore[arg-type]
                scores=torch.stack(scores[i]) if output_scores else None,
            )
            for i in range(n)
        ]

    def _text(self, ids: list[int], finish: str, stop: Sequence[str]) -> str:
        body = ids[:-1] if finish == "eos" else ids
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        cuts = [text.find(s) for s in stop if s in text]
        return text[: min(cuts)] if cuts else text

    # -- scoring ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def continuation_logprobs(
        self, context: Prompt, continuations: Sequence[str], batch_size: int = 16
    ) -> list[Continuation]:
        """log p(continuation | context) token by token under the combined distribution (TruthfulQA MC1/MC2).

        `context` is raw text, or chat messages rendered with each model's template and generation prompt.
        Tokenisation follows lm-eval: trailing whitespace of the context moves to the continuation, the
        continuation's tokens are those of encode(context + continuation) after encode(context). They are taken
        from the primary (reference) model's context and scored under every model, so all three score the same
        tokens.
        """
        texts = self._texts(context)
        ctx = texts[self.primary.name]
        moved = ctx[len(ctx.rstrip()) :]
        contexts: dict[str, list[int]] = {}
        for c in self.components:
            if not texts[c.name].endswith(moved):
                raise ValueError(
                    f"the {c.name} model's context does not end with the same whitespace as the "
                    f"{self.primary.name} model's ({moved!r}); the continuation would be tokenised differently"
                )
            contexts[c.name] = self._encode(c, texts[c.name][: len(texts[c.name]) - len(moved)])
        head = contexts[self.primary.name]
        conts = []
        for cont in continuations:
            whole = self._encode(self.primary, ctx + cont)  # = stripped context + (moved whitespace + cont)
            conts.append(whole[len(head) :])
        return self.continuation_logprobs_ids(contexts, conts, batch_size=batch_size)

    @torch.no_grad()
    def continuation_logprobs_ids(
        self,
        contexts: Mapping[str, Sequence[int]] | Sequence[int],
        continuations: Sequence[Sequence[int]],
        batch_size: int = 16,
    ) -> list[Continuation]:
        """Token-level log-likelihoods of continuation ids after per-model (or shared) context ids.

        Each chunk of continuations is one right-padded forward per model over context + continuation (right
        padding needs no position ids: pads lie after every real token); only the positions that predict a
        continuation token reach the LM head.
        """
        if not isinstance(contexts, Mapping):
            contexts = {c.name: list(contexts) for c in self.components}
        for c in self.components:
            if not contexts[c.name]:
                raise ValueError(f"empty context for the {c.name} model: the first token has nothing to condition on")
        if any(len(x) == 0 for x in continuations):
            raise ValueError("empty continuation: nothing to score")
        device = self.primary.model.device
        out: list[Continuation] = []
        for b in range(0, len(continuations), batch_size):
            chunk = [list(x) for x in continuations[b : b + batch_size]]
            longest = max(map(len, chunk))
            logits = {}
            for c in self.components:
                ctx = list(contexts[c.name])
                ids = torch.full((len(chunk), len(ctx) + longest), 0, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, cont in enumerate(chunk):
                    row = ctx + cont
                    ids[i, : len(row)] = torch.tensor(row)
                    mask[i, : len(row)] = 1
                kwargs = {"logits_to_keep": longest + 1} if _accepts(c.model, "logits_to_keep") else {}
                lg = c.model(
                    input_ids=ids.to(c.model.device), attention_mask=mask.to(c.model.device), use_cache=False, **kwargs
                ).logits
                # Position len(ctx) - 1 + k predicts continuation token k.
                lg = lg[:, -(longest + 1) : -1] if kwargs else lg[:, len(ctx) - 1 : len(ctx) - 1 + longest]
                logits[c.name] = lg[..., : self.vocab_size].float().to(device)
            combined = self.combine(logits)
            logp = combined.log_softmax(dim=-1)
            for i, cont in enumerate(chunk):
                target = torch.tensor(cont, device=device)
                lp = logp[i, : len(cont)].gather(1, target[:, None])[:, 0]
                greedy = bool((combined[i, : len(cont)].argmax(dim=-1) == target).all())
                out.append(Continuation(token_ids=cont, logprobs=lp.double().tolist(), is_greedy=greedy))
        return out


class SingleModel(LogitDecoder):
    """One causal LM through the same batched decoder (used by `atlantis generate` for a plain model)."""

    def __init__(self, model, tokenizer, template: str = "auto"):
        _, source = resolve_template(tokenizer, template)
        vocab = check_vocabularies({"model": model}, {"model": tokenizer})
        super().__init__([Component("model", model, tokenizer, source)], primary="model", vocab_size=vocab)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        template: str = "auto",
        dtype: str = "auto",
        device: str = "auto",
        trust_remote_code: bool = False,
        device_map: str | None = None,
        max_memory: Mapping[int | str, int] | None = None,
    ) -> SingleModel:
        """Load one model; `device_map="auto"` shards it across the visible GPUs (see `load_model`)."""
        dev = pick_device(device)
        tok = load_tokenizer(path, trust_remote_code)
        model = load_model(path, pick_dtype(dtype, dev), dev, trust_remote_code, device_map, max_memory)
        return cls(model, tok, template=template)

    def combine(self, logits: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return logits["model"]


class ProxyModel(LogitDecoder):
    """Proxy-tuned large model (Liu et al., 2024; paper Eq. 9): logits s_L + α (s_r − s_S).

    large, small: base models p_b^L and p_b^S; ref: p_r, the small model after fine-tuning (instruct). `tokenizer`
    is either one tokenizer shared by the three models (only LM-head sizes can then be checked) or a mapping
    {"large", "small", "ref"} -> tokenizer, whose token->id mappings must be identical.

    Prompts given as chat messages are rendered with `template` (resolved against the reference tokenizer, whose
    chat template it normally is) for all three models, so every model conditions on the same x, as Eq. 9 reads.
    `base_template` renders the two base models' prompts differently (e.g. `plain`); Liu et al.'s code gives the
    chat format to the expert only. Generated text is decoded with the reference tokenizer.
    """

    def __init__(
        self,
        large,
        small,
        ref,
        tokenizer,
        *,
        alpha: float = 1.0,
        template: str = "auto",
        base_template: str | None = None,
    ):
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha}")
        toks = dict(tokenizer) if isinstance(tokenizer, Mapping) else dict.fromkeys(ROLES, tokenizer)
        if set(toks) != set(ROLES):
            raise ValueError(f"tokenizers must be given for {ROLES}, got {sorted(toks)}")
        models = {"large": large, "small": small, "ref": ref}
        vocab = check_vocabularies(models, toks)
        _, ref_template = resolve_template(toks["ref"], template)
        base = ref_template if base_template is None else resolve_template(toks["large"], base_template)[1]
        comps = [
            Component("large", large, toks["large"], base),
            Component("small", small, toks["small"], base),
            Component("ref", ref, toks["ref"], ref_template),
        ]
        super().__init__(comps, primary="ref", vocab_size=vocab)
        self.alpha = float(alpha)

    @classmethod
    def from_pretrained(
        cls,
        large: str,
        small: str,
        ref: str,
        *,
        alpha: float = 1.0,
        template: str = "auto",
        base_template: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        trust_remote_code: bool = False,
        device_map: str | None = None,
        max_memory: Mapping[str, Mapping[int | str, int]] | None = None,
    ) -> ProxyModel:
        """Load the three models on one device, or each sharded across the visible GPUs (`device_map="auto"`;
        `max_memory` gives each role its own {gpu: bytes} share, as the three share the GPUs); the vocabularies
        are compared before any weights are read."""
        paths = {"large": large, "small": small, "ref": ref}
        toks = {role: load_tokenizer(p, trust_remote_code) for role, p in paths.items()}
        check_vocabularies({}, toks)
        dev = pick_device(device)
        torch_dtype = pick_dtype(dtype, dev)
        models = {
            role: load_model(p, torch_dtype, dev, trust_remote_code, device_map, (max_memory or {}).get(role))
            for role, p in paths.items()
        }
        return cls(
            models["large"],
            models["small"],
            models["ref"],
            toks,
            alpha=alpha,
            template=template,
            base_template=base_template,
        )

    def combine(self, logits: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Eq. 9: s_L + α (s_r − s_S)."""
        return logits["large"] + self.alpha * (logits["ref"] - logits["small"])
