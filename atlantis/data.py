"""Read SFT data in the common formats and normalise it to one record type keyed by a stable id.

Accepted record formats (auto-detected per record, or forced with `DataConfig.format`):

- ``sharegpt``: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": ...}]}`` (OpenHermes-2.5,
  the paper's training set, §3.1);
- ``messages``: OpenAI ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}``;
- ``alpaca``: ``{"instruction", "input"?, "output"}``;
- ``prompt_completion``: ``{"prompt", "completion"}``.

Files: JSONL, JSON (a list, or a mapping holding one list), Parquet, a `datasets` folder saved with
``save_to_disk``, or a Hub dataset id (``hf:owner/name`` or any non-existing path with one slash).

Every assistant turn of a conversation is response text (the y of p(y|x)); everything else is context.
Ids are the record's own ``id`` when present, else a content hash, so that every downstream file is keyed
by id and never by position.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from atlantis.config import field
from atlantis.log import get_logger

log = get_logger(__name__)

Role = Literal["system", "user", "assistant"]
FORMATS = ("sharegpt", "messages", "alpaca", "prompt_completion")

_SHAREGPT_ROLES: dict[str, Role] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
}


class DataError(ValueError):
    """Bad input data; the message names the file, the line (or row) and the field."""


@dataclass(frozen=True)
class Turn:
    role: Role
    content: str


@dataclass(frozen=True)
class Sample:
    """One SFT sample: a conversation whose assistant turns are the response."""

    id: str
    turns: tuple[Turn, ...]
    source: str = ""  # "file:line" for error messages

    def messages(self) -> list[dict[str, str]]:
        return [{"role": t.role, "content": t.content} for t in self.turns]

    @property
    def response_turns(self) -> list[int]:
        return [i for i, t in enumerate(self.turns) if t.role == "assistant"]


@dataclass
class DataConfig:
    path: str = field(help="JSONL/JSON/Parquet file, a `datasets` save_to_disk folder, or hf:<dataset id>.")
    format: Literal["auto", "sharegpt", "messages", "alpaca", "prompt_completion"] = field(
        "auto", help="Record format; `auto` detects it per record from its keys."
    )
    split: str = field("train", help="Split to read from a `datasets` folder or Hub dataset.")
    id_field: str = field("id", help="Field holding the sample id; records without it get a content hash.")
    on_invalid: Literal["error", "skip"] = field(
        "error",
        help="A record with no assistant turn or an empty response: `error` stops with file:line, "
        "`skip` excludes it and records why (logged and returned in the load report).",
    )
    on_duplicate: Literal["error", "keep_first"] = field(
        "error", help="Two records with the same id: `error`, or keep the first and report the others."
    )
    limit: int | None = field(None, help="Read only the first N records (for smoke runs).")

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("data.path is required")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"data.limit must be positive, got {self.limit}")


@dataclass
class LoadReport:
    """What was read and what was excluded, with reasons (written next to scores by callers)."""

    n_records: int = 0
    excluded: list[dict[str, str]] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------------------------- reading
# Input text is UTF-8. A byte-order mark (Windows editors, Excel exports) is skipped, not an error; any other
# undecodable byte stops with the file and line, where Python's UnicodeDecodeError names neither.


def decode_line(raw: bytes, path: str | Path, lineno: int) -> str:
    """One line of an input file as text; a non-UTF-8 line is a `DataError` naming file, line and byte."""
    if lineno == 1:
        raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: line {lineno} is not UTF-8 (byte 0x{raw[err.start]:02x} at position {err.start + 1}); "
            "re-save the file as UTF-8"
        ) from err


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line of a UTF-8 text file, a BOM skipped (`decode_line`)."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            yield lineno, decode_line(raw, path, lineno)


def read_text(path: str | Path) -> str:
    """A whole UTF-8 text file, a BOM skipped; a non-UTF-8 byte is a `DataError` naming its line."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        for lineno, line in enumerate(raw.split(b"\n"), start=1):
            decode_line(line, path, lineno)  # raises on the first bad line
        raise


def parse_json_line(line: str, path: str | Path, lineno: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno})") from err


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    for lineno, line in iter_lines(path):
        if line.strip():
            yield f"{path}:{lineno}", parse_json_line(line, path, lineno)


def read_jsonl(path: str | Path) -> list[Any]:
    """Every record of a JSONL file; a malformed line is a `DataError` naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return [rec for _, rec in _iter_jsonl(path)]


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        obj = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from err
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: a JSON object must hold exactly one list of records")
        obj = lists[0]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON list of records")
    for i, rec in enumerate(obj):
        yield f"{path}[{i}]", rec


def _iter_rows(rows: Any, label: str) -> Iterator[tuple[str, Any]]:
    for i, rec in enumerate(rows):
        yield f"{label}[row {i}]", rec


def iter_raw(cfg: DataConfig) -> Iterator[tuple[str, Any]]:
    """Yield (location, raw record) pairs from whatever `cfg.path` names."""
    spec = cfg.path
    path = Path(spec)
    if spec.startswith("hf:") or (not path.exists() and spec.count("/") == 1 and not path.suffix):
        import datasets

        name = spec.removeprefix("hf:")
        ds = datasets.load_dataset(name, split=cfg.split)
        yield from _iter_rows(ds, f"hf:{name}:{cfg.split}")
        return
    if not path.exists():
        raise DataError(f"{path}: data file does not exist")
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise DataError(f"{path}: no split {cfg.split!r} (has {list(ds)})")
            ds = ds[cfg.split]
        yield from _iter_rows(ds, str(path))
        return
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix in (".jsonl", ".ndjson"):
        yield from _iter_jsonl(path)
    elif suffix == ".json":
        yield from _iter_json(path)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from _iter_rows(pq.read_table(path).to_pylist(), str(path))
    else:
        raise DataError(f"{path}: unknown file type {suffix!r}; use .jsonl, .json, .parquet or a datasets folder")


# ------------------------------------------------------------------------------------------ normalising


def detect_format(rec: dict[str, Any]) -> str | None:
    if "conversations" in rec:
        return "sharegpt"
    if "messages" in rec:
        return "messages"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "prompt" in rec and "completion" in rec:
        return "prompt_completion"
    return None


def _text(value: Any, where: str, fieldname: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {fieldname!r} must be a string, got {type(value).__name__}")
    return value


def _turns(rec: dict[str, Any], fmt: str, where: str) -> list[Turn]:
    if fmt == "sharegpt":
        conv = rec["conversations"]
        if not isinstance(conv, list):
            raise DataError(f"{where}: field 'conversations' must be a list")
        turns = []
        for j, msg in enumerate(conv):
            if not isinstance(msg, dict) or "from" not in msg or "value" not in msg:
                raise DataError(f"{where}: field 'conversations[{j}]' needs 'from' and 'value'")
            role = _SHAREGPT_ROLES.get(str(msg["from"]).lower())
            if role is None:
                raise DataError(
                    f"{where}: field 'conversations[{j}].from' is {msg['from']!r}; "
                    f"expected one of {sorted(_SHAREGPT_ROLES)}"
                )
            turns.append(Turn(role, _text(msg["value"], where, f"conversations[{j}].value")))
        return turns
    if fmt == "messages":
        msgs = rec["messages"]
        if not isinstance(msgs, list):
            raise DataError(f"{where}: field 'messages' must be a list")
        turns = []
        for j, msg in enumerate(msgs):
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                raise DataError(f"{where}: field 'messages[{j}]' needs 'role' and 'content'")
            if msg["role"] not in ("system", "user", "assistant"):
                raise DataError(
                    f"{where}: field 'messages[{j}].role' is {msg['role']!r}; expected system, user or assistant"
                )
            turns.append(Turn(msg["role"], _text(msg["content"], where, f"messages[{j}].content")))
        return turns
    if fmt == "alpaca":
        instruction = _text(rec["instruction"], where, "instruction")
        extra = rec.get("input") or ""
        prompt = f"{instruction}\n\n{_text(extra, where, 'input')}" if extra.strip() else instruction
        return [Turn("user", prompt), Turn("assistant", _text(rec["output"], where, "output"))]
    if fmt == "prompt_completion":
        return [
            Turn("user", _text(rec["prompt"], where, "prompt")),
            Turn("assistant", _text(rec["completion"], where, "completion")),
        ]
    raise AssertionError(fmt)


def content_id(turns: list[Turn] | tuple[Turn, ...]) -> str:
    """A stable id from the conversation's content (role and text of every turn)."""
    canon = json.dumps([[t.role, t.content] for t in turns], ensure_ascii=False, separators=(",", ":"))
    return "h" + hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]


def normalise(rec: Any, where: str, cfg: DataConfig) -> Sample:
    """Turn one raw record into a `Sample`, or raise `DataError` naming where and which field."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    fmt = cfg.format if cfg.format != "auto" else detect_format(rec)
    if fmt is None:
        raise DataError(
            f"{where}: unknown record format (keys {sorted(rec)}); accepted formats: "
            "sharegpt {conversations:[{from,value}]}, messages {messages:[{role,content}]}, "
            "alpaca {instruction,input?,output}, prompt_completion {prompt,completion}"
        )
    required = {
        "sharegpt": ["conversations"],
        "messages": ["messages"],
        "alpaca": ["instruction", "output"],
        "prompt_completion": ["prompt", "completion"],
    }[fmt]
    for key in required:
        if key not in rec:
            raise DataError(f"{where}: format {fmt} needs field {key!r}")
    turns = _turns(rec, fmt, where)
    if not any(t.role == "assistant" for t in turns):
        raise DataError(f"{where}: conversation has no assistant turn (nothing to score as response)")
    for j, t in enumerate(turns):
        if t.role == "assistant" and not t.content.strip():
            raise DataError(f"{where}: empty response (assistant turn {j})")
    given = rec.get(cfg.id_field)
    sample_id = str(given) if given not in (None, "") else content_id(turns)
    return Sample(id=sample_id, turns=tuple(turns), source=where)


def load_samples(cfg: DataConfig, report: LoadReport | None = None) -> list[Sample]:
    """Read, normalise and de-duplicate; raise on bad input unless the config says to skip it."""
    report = report if report is not None else LoadReport()
    samples: list[Sample] = []
    seen: dict[str, str] = {}
    for where, rec in iter_raw(cfg):
        if cfg.limit is not None and report.n_records >= cfg.limit:
            break
        report.n_records += 1
        try:
            sample = normalise(rec, where, cfg)
        except DataError as err:  # malformed JSON is raised by the reader and always stops
            if cfg.on_invalid == "error":
                raise
            report.excluded.append({"source": where, "reason": str(err)})
            continue
        if sample.id in seen:
            msg = f"{where}: duplicate id {sample.id!r} (first seen at {seen[sample.id]})"
            if cfg.on_duplicate == "error":
                raise DataError(msg + "; set data.on_duplicate=keep_first to keep the first")
            report.excluded.append({"id": sample.id, "source": where, "reason": msg})
            continue
        seen[sample.id] = where
        samples.append(sample)
    if report.excluded:
        log.warning(
            "%s: excluded %d of %d records (see the load report)",
            cfg.path,
            len(report.excluded),
            report.n_records,
        )
    if not samples:
        raise DataError(f"{cfg.path}: no usable records")
    return samples
