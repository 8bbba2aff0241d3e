"""Render samples with the chat template of the model that reads them; token ids plus a response mask.

The response spans are found in characters, never from hard-coded token ids, so they are right for any
template: each assistant turn is rendered as a unique placeholder, the placeholders are located in the
rendered text, the real content is substituted back, and the result is checked to equal the template's
own rendering of the real conversation (a template that rewrites content is an error, not a silent
mis-mask).

One y under every template: the text is tokenised in segments split at the start and end of each response,
so a response's tokens are the tokenisation of the response text alone, whatever precedes it. Tokenising the
whole text instead lets a template's separator merge into the first response token (`"Assistant: hello"` ->
`' hello'`, one token, where a chat template's `"assistant\n" + "hello"` gives `'hello'`): p_S and p_r would then
score different token sequences and their per-token means would cover different text (issue 11). The named
templates put the response after a newline, where byte-level BPE and SentencePiece split anyway, so the forced
boundary is also the natural one; a template that puts it after a space (Llama-2-chat's `[/INST] `) leaves that
space as its own token. Tokenizers that prefix a word-start marker to every encoded string (SentencePiece's
dummy prefix, e.g. Llama-2's legacy tokenizer) encode a segment behind a newline and drop the newline's tokens.
Each `Rendered` carries its scored text (`response_text`), so a score file can prove which string it scored.

Which template reads a sample is the caller's choice (`template`): the workflow reads every base model p_S, p_L
through `plain` and every instruct model p_r through its own chat template (README, "What p_S(y|x) means").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from jinja2 import TemplateError

from atlantis.config import field
from atlantis.data import DataError, Sample, Turn, read_text
from atlantis.log import get_logger

log = get_logger(__name__)

# Named templates for models without one. `plain` is the default fallback for base models; `alpaca` is the
# Stanford Alpaca prompt used by Cherry_LLM (IFD) and Superfiltering; `chatml` is Qwen's/OpenHermes' format.
# The end-of-sequence token after each response teaches a base model to stop when it is fine-tuned.
NAMED_TEMPLATES: dict[str, str] = {
    # the response follows a newline: a token boundary under every tokenizer (see the module docstring)
    "plain": (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n\nAssistant:\n' }}"
        # an assistant turn not answering a user turn (ShareGPT chunks often open with one) gets its own header,
        # so its first token is predicted from context as under a chat template
        "{% else %}{% if loop.first or messages[loop.index0 - 1]['role'] != 'user' %}{{ 'Assistant:\n' }}{% endif %}"
        "{{ m['content'] + (eos_token or '') + '\n\n' }}{% endif %}"
        "{% endfor %}"
    ),
    "alpaca": (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'user' %}"
        "{% if loop.first %}{{ 'Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n' }}{% endif %}"
        "{{ '### Instruction:\n' + m['content'] + '\n\n### Response:' }}"
        "{% else %}{{ m['content'] + (eos_token or '') + '\n\n' }}{% endif %}"
        "{% endfor %}"
    ),
    # Superfiltering's released prompt (code_ifd/data_analysis.py, `--prompt none`): "{instruction}\n" + output
    "superfiltering": (
        "{% for m in messages %}"
        "{% if m['role'] == 'assistant' %}{{ m['content'] + '\n' }}{% else %}{{ m['content'] + '\n' }}{% endif %}"
        "{% endfor %}"
    ),
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}


# Named texts before a response in the direct pass of IFD (`render.direct_prefix`).
DIRECT_PREFIXES = {"none": "", "alpaca": "### Response:"}  # Cherry_LLM data_analysis.py: '### Response:' + output


@dataclass
class RenderConfig:
    template: str = field(
        "auto",
        help="`auto` (the tokenizer's chat template, else `plain`), `model` (require the tokenizer's own), "
        f"a named template {sorted(NAMED_TEMPLATES)}, or a path to a .jinja file.",
    )
    max_length: int = field(
        2048,
        help="Keep the first max_length tokens. A partly cut response is scored on what remains and "
        "flagged; a fully cut one is excluded and reported, never scored.",
    )
    context: Literal["full", "response_only"] = field(
        "full",
        help="`full`: score y given the rendered conversation (p(y|x)); `response_only`: score the response "
        "text alone (p(y), the 'direct' term of IFD), each response behind `direct_prefix`, and only as many of "
        "its tokens as the `full` rendering keeps under max_length (the upstream scripts' same-span trimming).",
    )
    direct_prefix: str = field(
        "none",
        help="Text before each response in `response_only`: `none`, `alpaca` ('### Response:', Cherry_LLM's IFD "
        "direct pass) or any other literal text.",
    )
    include_end_of_turn: bool = field(
        False,
        help="Also count the special end-of-turn token after each response (e.g. <|im_end|>). Off for "
        "scoring so that y is the same text under base and instruct templates; training turns it on.",
    )
    system: Literal["keep", "merge"] = field(
        "keep",
        help="System turns: `keep`, or `merge` into the first user turn. With `keep`, a template that "
        "rejects system turns (e.g. Gemma-2) gets them merged, with a warning.",
    )

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"render.max_length must be >= 2, got {self.max_length}")


@dataclass(frozen=True)
class Rendered:
    """A tokenised sample. `labels_mask[j]` is True when token j is a scored response token."""

    id: str
    input_ids: list[int]
    labels_mask: list[bool]
    n_response_full: int  # response tokens before truncation
    truncated: bool
    response_text: str = ""  # the scored tokens, decoded (the same string for every model that scores y)

    @property
    def n_response(self) -> int:
        return sum(self.labels_mask)

    def __len__(self) -> int:
        return len(self.input_ids)


def resolve_template(tokenizer, spec: str) -> tuple[str, str]:
    """Return (name, jinja source) for a template spec."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: use the default one
        own = own.get("default")
    if spec == "auto":
        if own:
            return "model", own
        log.info("tokenizer has no chat template: using the named template 'plain'")
        return "plain", NAMED_TEMPLATES["plain"]
    if spec == "model":
        if not own:
            raise DataError("render.template=model but the tokenizer has no chat_template")
        return "model", own
    if spec in NAMED_TEMPLATES:
        return spec, NAMED_TEMPLATES[spec]
    path = Path(spec)
    if path.is_file():
        return str(path), read_text(path)
    raise DataError(f"unknown template {spec!r}: use auto, model, {sorted(NAMED_TEMPLATES)} or a .jinja path")


def _strip_span(text: str, span: tuple[int, int]) -> tuple[int, int]:
    """The span without trailing whitespace: whatever follows y (EOS, an end-of-turn token, a blank line) is the
    template's, never scored. Leading whitespace stays where the template keeps it (the tiny world's answers are
    " lake."): a template that strips it (Llama-2-chat, Gemma) then scores another string, and the weights step
    excludes such samples by name (their decoded scored text differs)."""
    a, b = span
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def _merge_system(turns: Sequence[Turn]) -> list[Turn]:
    system = "\n\n".join(t.content for t in turns if t.role == "system")
    rest = [t for t in turns if t.role != "system"]
    if system and rest and rest[0].role == "user":
        rest[0] = Turn("user", f"{system}\n\n{rest[0].content}")
    return rest


class Renderer:
    """Renders samples for one tokenizer; holds the resolved template and special-token patterns."""

    def __init__(self, tokenizer, cfg: RenderConfig):
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("a fast tokenizer is required (character offsets locate the response)")
        self.tok = tokenizer
        self.cfg = cfg
        self.template_name, self.template = resolve_template(tokenizer, cfg.template)
        specials = sorted({s for s in tokenizer.all_special_tokens if s}, key=len, reverse=True)
        self._eot = re.compile(r"\s*(?:" + "|".join(map(re.escape, specials)) + ")") if specials else None
        self._warned_system = False
        # The tokens the tokenizer adds in front of a text (BOS, if any) and whether it prefixes a word-start
        # marker to every string it encodes (SentencePiece's dummy prefix): segments after the first are then
        # encoded behind a newline whose tokens are dropped, as they would be tokenised inside the whole text.
        bare = self._encode(["a"])[0]
        full = tokenizer("a")["input_ids"]
        self._lead = list(full[: len(full) - len(bare)]) if full[len(full) - len(bare) :] == bare else []
        self._newline = self._encode(["\n"])[0]
        behind = self._encode(["\na"])[0]
        self._dummy_prefix = behind[: len(self._newline)] == self._newline and behind[len(self._newline) :] != bare
        self._sentinels: dict[str, list[int]] = {"\n": self._newline}

    # -- text ------------------------------------------------------------------------------------------
    def _apply(self, turns: Sequence[Turn]) -> str:
        msgs = [{"role": t.role, "content": t.content} for t in turns]
        return self.tok.apply_chat_template(msgs, chat_template=self.template, tokenize=False)

    def text_and_spans(self, sample: Sample) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans of every response."""
        if self.cfg.context == "response_only":
            text, spans = "", []
            for k, i in enumerate(sample.response_turns):
                text += ("\n\n" if k else "") + DIRECT_PREFIXES.get(self.cfg.direct_prefix, self.cfg.direct_prefix)
                spans.append(
                    _strip_span(text + sample.turns[i].content, (len(text), len(text) + len(sample.turns[i].content)))
                )
                text += sample.turns[i].content
            return text, spans
        turns = list(sample.turns)
        if self.cfg.system == "merge":
            turns = _merge_system(turns)
        try:
            return self._locate(sample, turns)
        except TemplateError as err:  # e.g. Gemma-2's "System role not supported"
            if not any(t.role == "system" for t in turns):
                raise DataError(f"{sample.source or sample.id}: chat template failed: {err}") from err
            if not self._warned_system:
                log.warning(
                    "template %s rejects system turns (%s): merging them into the first user turn",
                    self.template_name,
                    err,
                )
                self._warned_system = True
            return self._locate(sample, _merge_system(turns))

    def _locate(self, sample: Sample, turns: list[Turn]) -> tuple[str, list[tuple[int, int]]]:
        marks = {i: f"\u27e6ATLANTIS-RESPONSE-{i}\u27e7" for i, t in enumerate(turns) if t.role == "assistant"}
        skeleton = self._apply([Turn(t.role, marks.get(i, t.content)) for i, t in enumerate(turns)])
        real = self._apply(turns)
        # Templates such as Llama-2's and Gemma's strip the content: try it as is, then stripped.
        for strip in (None, "both", "right", "left"):
            text, spans, cursor = [], [], 0
            for i, mark in marks.items():
                at = skeleton.find(mark, cursor)
                if at < 0 or skeleton.count(mark) != 1:
                    raise DataError(
                        f"{sample.source or sample.id}: the chat template dropped or repeated "
                        f"assistant turn {i}; cannot locate the response"
                    )
                content = turns[i].content
                content = {None: content, "both": content.strip(), "right": content.rstrip(), "left": content.lstrip()}[
                    strip
                ]
                text.append(skeleton[cursor:at])
                start = sum(map(len, text))
                text.append(content)
                spans.append((start, start + len(content)))
                cursor = at + len(mark)
            text.append(skeleton[cursor:])
            joined = "".join(text)
            if joined == real:
                return joined, [self._extend(joined, _strip_span(joined, s)) for s in spans]
        raise DataError(
            f"{sample.source or sample.id}: the chat template rewrites the response text, so its "
            "tokens cannot be located reliably; use another render.template"
        )

    def _extend(self, text: str, span: tuple[int, int]) -> tuple[int, int]:
        if not self.cfg.include_end_of_turn or self._eot is None:
            return span
        m = self._eot.match(text, span[1])
        return (span[0], m.end()) if m else span

    # -- tokens ----------------------------------------------------------------------------------------
    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tok(list(texts), add_special_tokens=False)["input_ids"] if texts else []

    def _segments(self, text: str, spans: Sequence[tuple[int, int]]) -> list[tuple[str, bool]]:
        """`text` cut at the start and end of every response span: (segment, is_response), empty ones left out.
        A whitespace-only response has an empty span: nothing of it is scored."""
        out, pos = [], 0
        for a, b in spans:
            out += [(text[pos:a], False), (text[a:b], True)]
            pos = b
        out.append((text[pos:], False))
        return [(seg, resp) for seg, resp in out if seg]

    def _behind(self, segment: str, first: list[int]) -> list[int]:
        """A segment's tokens as inside a text, for a dummy-prefix tokenizer: encoded behind a sentinel whose own
        tokens are then dropped. `first` is the encoding behind a newline; where the newline merged with the
        segment's start (a `\n\n` token), other sentinels are tried."""
        for sentinel in ("\n", "a", "#", "0", "\t"):
            lead = self._sentinels.setdefault(sentinel, self._encode([sentinel])[0])
            toks = first if sentinel == "\n" else self._encode([sentinel + segment])[0]
            if toks[: len(lead)] == lead:
                return toks[len(lead) :]
        raise DataError(f"cannot encode {segment[:40]!r} inside a text with this tokenizer (every sentinel merged)")

    def _tokenise(self, texts: Sequence[str], spans: Sequence[Sequence[tuple[int, int]]]):
        """Token ids and response mask of each text, encoded segment by segment (one batched call)."""
        bos = self.tok.bos_token
        pieces, owner = [], []
        for i, (text, sp) in enumerate(zip(texts, spans)):
            for k, (seg, resp) in enumerate(self._segments(text, sp)):
                behind = self._dummy_prefix and k > 0
                pieces.append("\n" + seg if behind else seg)
                owner.append((i, resp, seg if behind else None))
        encoded = self._encode(pieces)
        ids: list[list[int]] = [[] for _ in texts]
        mask: list[list[bool]] = [[] for _ in texts]
        for i, text in enumerate(texts):
            if not (bos and text.startswith(bos)):  # a template that writes BOS itself gets no second one
                ids[i] += self._lead
                mask[i] += [False] * len(self._lead)
        for (i, resp, behind), toks in zip(owner, encoded):
            if behind is not None:
                toks = self._behind(behind, toks)
            ids[i] += toks
            mask[i] += [resp] * len(toks)
        return ids, mask

    def _kept_in_context(self, samples: Sequence[Sample], batch_size: int) -> dict[str, int]:
        """Response tokens the `full` rendering keeps under max_length, per id (0: none)."""
        rendered, _ = Renderer(self.tok, replace(self.cfg, context="full")).render(samples, batch_size)
        return {r.id: r.n_response for r in rendered}

    def render(self, samples: Sequence[Sample], batch_size: int = 512) -> tuple[list[Rendered], list[dict]]:
        """Tokenise samples; returns (rendered, excluded) where excluded holds fully truncated samples."""
        out: list[Rendered] = []
        excluded: list[dict] = []
        # IFD's direct pass scores as many response tokens as the conditioned pass keeps (Cherry_LLM: max_length
        # - prompt + len("### Response:"); Superfiltering: max_length - prompt + 1): the ratio compares one span.
        same_span = self._kept_in_context(samples, batch_size) if self.cfg.context == "response_only" else None
        for b in range(0, len(samples), batch_size):
            chunk = samples[b : b + batch_size]
            texts, spans = zip(*(self.text_and_spans(s) for s in chunk))
            all_ids, all_masks = self._tokenise(texts, spans)
            for sample, ids, mask in zip(chunk, all_ids, all_masks):
                mask[0] = False  # the first token has no context to be predicted from
                n_full, n_tokens = sum(mask), len(ids)
                ids, mask = ids[: self.cfg.max_length], mask[: self.cfg.max_length]
                reason = None
                if same_span is not None:
                    limit = same_span.get(sample.id, 0)
                    seen = 0
                    for j, m in enumerate(mask):
                        seen += m
                        if m and seen > limit:
                            mask[j] = False
                    if limit == 0 and n_full:
                        reason = "no response token within max_length in the conditioned rendering"
                n_kept = sum(mask)
                if n_full == 0:  # e.g. a one-token response scored without context and without BOS
                    reason = "no response token can be scored (the response is the sequence's first token)"
                elif n_kept == 0 and reason is None:
                    reason = f"response fully truncated ({n_tokens} tokens, max_length {self.cfg.max_length})"
                if reason:
                    excluded.append({"id": sample.id, "source": sample.source, "reason": reason})
                    continue
                text = self.tok.decode([t for t, m in zip(ids, mask) if m])
                out.append(Rendered(sample.id, list(ids), mask, n_full, n_kept < n_full, text))
        if excluded:
            log.warning(
                "excluded %d sample(s) with no scorable response token (truncated at max_length=%d?)",
                len(excluded),
                self.cfg.max_length,
            )
        return out, excluded
