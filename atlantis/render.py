"""Render samples with the chat template of the model that reads them; token ids plus a response mask.

The mask is derived from character spans, never from hard-coded token ids, so it is right for any
template: each assistant turn is rendered as a unique placeholder, the placeholders are located in the
rendered text, the real content is substituted back, and the result is checked to equal the template's
own rendering of the real conversation (a template that rewrites content is an error, not a silent
mis-mask). A token belongs to the response when its character span overlaps a response span.

p_S is a base model and p_r an instruct model (paper Table 1), so each reads the sample in its own format:
`template="auto"` uses the tokenizer's chat template and falls back to the named `plain` template for base
models that have none.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from jinja2 import TemplateError

from atlantis.config import field
from atlantis.data import DataError, Sample, Turn
from atlantis.log import get_logger

log = get_logger(__name__)

# Named templates for models without one. `plain` is the default fallback for base models; `alpaca` is the
# Stanford Alpaca prompt used by Cherry_LLM (IFD) and Superfiltering; `chatml` is Qwen's/OpenHermes' format.
# The end-of-sequence token after each response teaches a base model to stop when it is fine-tuned.
NAMED_TEMPLATES: dict[str, str] = {
    "plain": (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n\nAssistant: ' }}"
        "{% else %}{{ m['content'] + (eos_token or '') + '\n\n' }}{% endif %}"
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
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}


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
        "text alone (p(y), the 'direct' term of IFD).",
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
        return str(path), path.read_text()
    raise DataError(f"unknown template {spec!r}: use auto, model, {sorted(NAMED_TEMPLATES)} or a .jinja path")


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

    # -- text ------------------------------------------------------------------------------------------
    def _apply(self, turns: Sequence[Turn]) -> str:
        msgs = [{"role": t.role, "content": t.content} for t in turns]
        return self.tok.apply_chat_template(msgs, chat_template=self.template, tokenize=False)

    def text_and_spans(self, sample: Sample) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans of every response."""
        if self.cfg.context == "response_only":
            parts = [sample.turns[i].content for i in sample.response_turns]
            spans, pos = [], 0
            for part in parts:
                spans.append((pos, pos + len(part)))
                pos += len(part) + 2
            return "\n\n".join(parts), spans
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
                return joined, [self._extend(joined, s) for s in spans]
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
    def render(self, samples: Sequence[Sample], batch_size: int = 512) -> tuple[list[Rendered], list[dict]]:
        """Tokenise samples; returns (rendered, excluded) where excluded holds fully truncated samples."""
        out: list[Rendered] = []
        excluded: list[dict] = []
        bos = self.tok.bos_token
        for b in range(0, len(samples), batch_size):
            chunk = samples[b : b + batch_size]
            texts, spans = zip(*(self.text_and_spans(s) for s in chunk))
            # A template that writes BOS itself must not get a second one from the tokenizer.
            groups: dict[bool, list[int]] = {True: [], False: []}
            for i, text in enumerate(texts):
                groups[not (bos and text.startswith(bos))].append(i)
            encoded: dict[int, tuple[list[int], list[tuple[int, int]]]] = {}
            for add_special, idx in groups.items():
                if not idx:
                    continue
                enc = self.tok([texts[i] for i in idx], add_special_tokens=add_special, return_offsets_mapping=True)
                for k, i in enumerate(idx):
                    encoded[i] = (enc["input_ids"][k], enc["offset_mapping"][k])
            for i, sample in enumerate(chunk):
                ids, offsets = encoded[i]
                mask = [e > s and any(s < b1 and e > a1 for a1, b1 in spans[i]) for s, e in offsets]
                mask[0] = False  # the first token has no context to be predicted from
                n_full = sum(mask)
                ids, mask = ids[: self.cfg.max_length], mask[: self.cfg.max_length]
                n_kept = sum(mask)
                reason = None
                if n_full == 0:  # e.g. a one-token response scored without context and without BOS
                    reason = "no response token can be scored (the response is the sequence's first token)"
                elif n_kept == 0:
                    reason = f"response fully truncated ({len(encoded[i][0])} tokens, max_length {self.cfg.max_length})"
                if reason:
                    excluded.append({"id": sample.id, "source": sample.source, "reason": reason})
                    continue
                out.append(Rendered(sample.id, list(ids), mask, n_full, n_kept < n_full))
        if excluded:
            log.warning(
                "excluded %d sample(s) with no scorable response token (truncated at max_length=%d?)",
                len(excluded),
                self.cfg.max_length,
            )
        return out, excluded
