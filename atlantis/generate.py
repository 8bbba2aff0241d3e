"""`atlantis generate`: answer MT-Bench / AlpacaEval questions with one model or a proxy-tuned triple.

Input, one JSON object per line (a `.json` list is read too):

- MT-Bench (FastChat's ``question.jsonl``): ``{"question_id", "category", "turns": [str, ...]}``; every turn is
  answered with the conversation so far, the model's own earlier answers included;
- AlpacaEval style: ``{"question_id", "instruction"}`` (or ``"prompt"``): a single turn.

Output: FastChat's answer format, one line per question, so that ``fastchat.llm_judge.gen_judgment`` reads it
unchanged: ``{"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [...]}], "tstamp"}``.

How it differs from FastChat's ``gen_model_answer`` (batch 1, CUDA hard-coded): questions are answered
``batch_size`` at a time with left padding (turn t of every question in the batch is one batched decode), on
any device; a question's line is appended and flushed when its batch is done, and a rerun skips the question ids
already in the file (after checking that the decoding settings are the ones the file was made with). FastChat's
per-category MT-Bench temperatures are the default. Sampling seeds are derived from (seed, question id, turn),
so a sampled answer is the same whatever batch the question lands in and whether or not the run was resumed.

The proxy path (three models, logits s_L + α (s_r − s_S)) is the paper's proxy-tuning baseline (§2.3 Eq. 9,
Appendix B / Table 7); see `atlantis.proxy`.

Answers end at the end of the assistant turn: at any EOS and at the end-of-turn token of the model's chat template
(`atlantis.models.end_of_turn`), which is dropped from the text. Models larger than one GPU are sharded across
the visible GPUs (`device_map`); a single model can instead go through vLLM (`backend`), where it is installed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from tqdm.auto import tqdm

from atlantis.config import field
from atlantis.data import DataError, _iter_json, _iter_jsonl, decode_line
from atlantis.log import get_logger
from atlantis.models import (
    check_model_source,
    choose_device_map,
    end_of_turn,
    eos_token_ids,
    gpu_max_memory,
    load_tokenizer,
    pick_device,
    pick_dtype,
    weight_bytes,
)
from atlantis.proxy import GREEDY_BELOW, Generation, ProxyModel, SingleModel, encode_prompt
from atlantis.render import NAMED_TEMPLATES, resolve_template

log = get_logger(__name__)

# FastChat llm_judge/common.py `temperature_config`; gen_model_answer uses 0.7 for any other category.
MT_BENCH_TEMPERATURE: dict[str, float] = {
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
DEFAULT_TEMPERATURE = 0.7

# Fields that change the answers: a resumed run must use the same ones as the file's first run.
_SETTINGS = (
    "model",
    "large",
    "small",
    "ref",
    "alpha",
    "model_id",
    "max_new_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "template",
    "base_template",
    "dtype",
)


class GenerateError(RuntimeError):
    """Generation cannot go on as asked (an existing output made with other settings, ...)."""


@dataclass
class GenerateConfig:
    questions: str = field(help="Questions: JSONL with question_id and turns (MT-Bench) or instruction/prompt.")
    out: str = field(help="Answers file (.jsonl, FastChat format); existing question ids are skipped (resume).")
    model: str | None = field(None, help="A single model folder or Hub id; or give large/small/ref instead.")
    large: str | None = field(None, help="Proxy-tuning: the large base model p_b^L (Eq. 9).")
    small: str | None = field(None, help="Proxy-tuning: the small base model p_b^S.")
    ref: str | None = field(None, help="Proxy-tuning: the reference model p_r (the small model fine-tuned).")
    alpha: float = field(1.0, help="Proxy-tuning strength: logits s_L + alpha (s_r - s_S).")
    model_id: str | None = field(
        None, help="model_id written in every answer; default: the model folder's name, or proxy-<large>-a<alpha>."
    )
    max_new_tokens: int = field(1024, help="Tokens generated per turn at most (FastChat's default 1024).")
    temperature: float | None = field(
        None,
        help="Sampling temperature (below 1e-4: greedy). None: FastChat's MT-Bench temperature for the "
        "question's category (0.7 writing/roleplay, 0.1 stem/humanities, 0 otherwise), 0.7 without one.",
    )
    top_p: float = field(1.0, help="Nucleus sampling: keep the most likely tokens holding this probability.")
    seed: int = field(0, help="Sampling seed; each (question, turn) gets its own seed derived from it.")
    batch_size: int = field(8, help="Questions decoded together (left padding).")
    stop: list[str] = field(default_factory=list, help="Extra stop strings; EOS tokens always stop.")
    template: str = field(
        "auto",
        help="Chat template of the model (of the reference model for a proxy): `auto` (the tokenizer's, else "
        f"`plain`), `model` (require the tokenizer's own), one of {sorted(NAMED_TEMPLATES)}, or a .jinja path.",
    )
    base_template: str | None = field(
        None, help="Proxy only: template for the two base models; None: the same prompt as the reference model."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        "auto", help="`auto`: float32 on CPU, bfloat16 on GPU."
    )
    device: str = field("auto", help="`auto` (cuda if available, else cpu) or a torch device.")
    device_map: Literal["auto", "none"] | None = field(
        None,
        help="`auto`: shard each model across the visible GPUs (accelerate's device map, weights loaded straight "
        "onto the GPUs); `none`: the whole model on `device`. Unset: auto when more than one GPU is visible. "
        "A model larger than one GPU on one device is refused before loading.",
    )
    gpu_memory_fraction: float = field(
        0.9, help="Share of each GPU's memory the weights may fill when sharded (the rest: activations, KV cache)."
    )
    backend: Literal["auto", "hf", "vllm"] = field(
        "auto",
        help="`hf`: the batched transformers decoder; `vllm`: vLLM with tensor parallelism over the visible GPUs "
        "(single model only); `auto`: vllm when it is installed and CUDA is available, else hf. Proxy-tuning "
        "always uses hf.",
    )
    trust_remote_code: bool = field(False, help="Allow a model folder's own Python code to run.")
    limit: int | None = field(None, help="Answer only the first N questions (for smoke runs).")
    overwrite: bool = field(False, help="Start the answers file afresh instead of resuming it.")

    def __post_init__(self) -> None:
        proxy = [self.large, self.small, self.ref]
        if self.model is not None and any(p is not None for p in proxy):
            raise ValueError("give either model or large/small/ref (proxy-tuning), not both")
        if self.model is None and not all(proxy):
            raise ValueError("give model, or all three of large, small and ref for proxy-tuning")
        if not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be finite, got {self.alpha}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 or None, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.gpu_memory_fraction <= 1.0:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be positive, got {self.limit}")
        if not self.out.endswith(".jsonl"):
            raise ValueError(f"out must be a .jsonl file, got {self.out!r}")
        if self.model_id is None:
            self.model_id = (
                Path(self.model).name
                if self.model is not None
                else f"proxy-{Path(str(self.large)).name}-a{self.alpha:g}"
            )

    @property
    def is_proxy(self) -> bool:
        return self.model is None


@dataclass(frozen=True)
class Question:
    question_id: int | str
    turns: tuple[str, ...]
    category: str | None = None
    source: str = ""  # "file:line" for error messages


# ------------------------------------------------------------------------------------------------ input


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    """(file:line, record) pairs of a JSONL or JSON questions file, through the data layer's readers."""
    if not path.is_file():
        raise DataError(f"{path}: questions file does not exist")
    yield from (_iter_json(path) if path.suffix == ".json" else _iter_jsonl(path))


def instruction_id(instruction: str) -> str:
    """The id of an AlpacaEval instruction without one: its content hash (`atlantis.data.content_id`)."""
    from atlantis.data import Turn, content_id

    return content_id([Turn("user", instruction)])


def parse_question(rec: Any, where: str) -> Question:
    """One question record, or `DataError` naming file:line and the field."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a question must be a JSON object, got {type(rec).__name__}")
    qid = rec.get("question_id")
    if qid is None and "turns" not in rec and isinstance(rec.get("instruction", rec.get("prompt")), str):
        # AlpacaEval's eval set has no ids: the instruction's content hash, as the data layer ids SFT samples
        qid = instruction_id(rec.get("instruction", rec.get("prompt")))
    if isinstance(qid, bool) or not isinstance(qid, (int, str)) or qid == "":
        raise DataError(f"{where}: field 'question_id' must be a non-empty string or an integer, got {qid!r}")
    if "turns" in rec:
        turns = rec["turns"]
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: field 'turns' must be a non-empty list of strings")
        # MT-Bench writes each turn as a string; Arena-Hard-Auto v0.1's question.jsonl as {"content": string}
        turns = [t["content"] if isinstance(t, dict) and "content" in t else t for t in turns]
        for j, turn in enumerate(turns):
            if not isinstance(turn, str) or not turn.strip():
                raise DataError(f"{where}: field 'turns[{j}]' must be a non-empty string (or {{\"content\": string}})")
    else:
        key = next((k for k in ("instruction", "prompt") if k in rec), None)
        if key is None:
            raise DataError(f"{where}: a question needs 'turns' (MT-Bench) or 'instruction'/'prompt' (AlpacaEval)")
        if not isinstance(rec[key], str) or not rec[key].strip():
            raise DataError(f"{where}: field {key!r} must be a non-empty string")
        turns = [rec[key]]
    category = rec.get("category")
    return Question(qid, tuple(turns), category if isinstance(category, str) else None, where)


def load_questions(path: str | Path, limit: int | None = None) -> list[Question]:
    """Read and check every question; duplicate ids are an error naming both places."""
    out: list[Question] = []
    seen: dict[str, str] = {}
    for where, rec in _records(Path(path)):
        if limit is not None and len(out) >= limit:
            break
        q = parse_question(rec, where)
        key = str(q.question_id)
        if key in seen:
            raise DataError(f"{where}: duplicate question_id {q.question_id!r} (first at {seen[key]})")
        seen[key] = where
        out.append(q)
    if not out:
        raise DataError(f"{path}: no questions")
    return out


# ----------------------------------------------------------------------------------------------- output


def _settings(cfg: GenerateConfig) -> dict[str, Any]:
    full = dataclasses.asdict(cfg)
    return {k: full[k] for k in _SETTINGS}


def settings_path(out: Path) -> Path:
    return out.with_name(out.name + ".settings.json")


def read_done(out: Path, model_id: str) -> set[str]:
    """Question ids already answered in `out`; a line cut short by a killed run is removed, with a warning."""
    if not out.exists():
        return set()
    raw = out.read_bytes()
    lines = raw.split(b"\n")
    done: set[str] = set()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            if lineno == len(lines):  # the last line has no newline: the write was interrupted
                log.warning("%s:%d: dropping an incomplete last line (an interrupted run)", out, lineno)
                with out.open("r+b") as fh:
                    fh.truncate(len(raw) - len(line))
                break
            if isinstance(err, UnicodeDecodeError):
                decode_line(line, out, lineno)  # raises, naming the line and the byte
            raise DataError(f"{out}:{lineno}: malformed JSON ({err.msg}); fix or remove the line") from err
        if not isinstance(rec, dict) or "question_id" not in rec:
            raise DataError(f"{out}:{lineno}: not an answer record (no question_id)")
        if rec.get("model_id") != model_id:
            raise GenerateError(
                f"{out}:{lineno}: answer of model_id {rec.get('model_id')!r}, but this run is {model_id!r}; "
                "use another out file (FastChat keeps one file per model)"
            )
        done.add(str(rec["question_id"]))
    if raw and not raw.endswith(b"\n") and out.read_bytes() == raw:  # a complete last line without newline
        with out.open("ab") as fh:
            fh.write(b"\n")
    return done


def _check_settings(cfg: GenerateConfig, out: Path, resuming: bool) -> None:
    """Refuse to add answers made with other decoding settings to an existing file."""
    path = settings_path(out)
    now = _settings(cfg)
    if resuming and path.exists():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
        if changed:
            diff = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
            raise GenerateError(f"{out} was made with other settings ({diff}); use another out file or overwrite=true")
    elif resuming:
        log.warning("%s has no %s: cannot check that it was made with the same settings", out, path.name)
    path.write_text(json.dumps(now, indent=1) + "\n")


def answer_id(model_id: str, question_id: int | str, turns: Sequence[str]) -> str:
    """A stable 22-character id (FastChat uses a random shortuuid of that length)."""
    canon = json.dumps([model_id, question_id, list(turns)], ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:22]


def answer_record(model_id: str, question: Question, answers: Sequence[str]) -> dict[str, Any]:
    """One line of FastChat's model_answer/<model_id>.jsonl."""
    return {
        "question_id": question.question_id,
        "answer_id": answer_id(model_id, question.question_id, answers),
        "model_id": model_id,
        "choices": [{"index": 0, "turns": list(answers)}],
        "tstamp": time.time(),
    }


# ----------------------------------------------------------------------------------------------- decoding


def question_temperature(question: Question, temperature: float | None) -> float:
    if temperature is not None:
        return temperature
    return MT_BENCH_TEMPERATURE.get(question.category or "", DEFAULT_TEMPERATURE)


def turn_seed(seed: int, question_id: int | str, turn: int) -> int:
    """A seed per (question, turn), independent of batching and of resuming."""
    digest = hashlib.sha256(f"{seed}:{question_id!r}:{turn}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # < 2**63


def conversation(question: Question, answers: Sequence[str], turn: int) -> list[dict[str, str]]:
    """Messages for turn `turn`: every earlier question with the model's own answer, then this question."""
    msgs: list[dict[str, str]] = []
    for t in range(turn):
        msgs.append({"role": "user", "content": question.turns[t]})
        msgs.append({"role": "assistant", "content": answers[t]})
    msgs.append({"role": "user", "content": question.turns[turn]})
    return msgs


class Decoder(Protocol):
    """What `answer_batch` needs: `LogitDecoder` (HF path) and `VllmDecoder` both provide it."""

    def generate(
        self,
        prompts: Sequence[Sequence[Mapping[str, str]]],
        *,
        max_new_tokens: int,
        temperature: Sequence[float],
        top_p: float,
        seed: Sequence[int],
        stop: Sequence[str],
    ) -> list[Generation]: ...


def answer_batch(decoder: Decoder, questions: Sequence[Question], cfg: GenerateConfig) -> list[list[str]]:
    """Answers to every turn of every question; turn t of all questions that have one is one batched decode."""
    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(max(len(q.turns) for q in questions)):
        rows = [i for i, q in enumerate(questions) if len(q.turns) > turn]
        gens = decoder.generate(
            [conversation(questions[i], answers[i], turn) for i in rows],
            max_new_tokens=cfg.max_new_tokens,
            temperature=[question_temperature(questions[i], cfg.temperature) for i in rows],
            top_p=cfg.top_p,
            seed=[turn_seed(cfg.seed, questions[i].question_id, turn) for i in rows],
            stop=cfg.stop,
        )
        for i, gen in zip(rows, gens):
            answers[i].append(gen.text.strip())  # as FastChat does
    return answers


# ----------------------------------------------------------------------------------------------- loading


def placement(cfg: GenerateConfig) -> tuple[str | None, dict[str, dict[int, int]] | None]:
    """(device_map, {role: max_memory}) for the HF path: shard when asked, or by default on several GPUs.

    The three models of a proxy share the GPUs, so each gets a share of every GPU's budget in proportion to its
    weights; unsharded, all three must fit one device together.
    """
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    roles = ("large", "small", "ref") if cfg.is_proxy else ("model",)
    paths = {role: str(getattr(cfg, role)) for role in roles}
    sizes = {role: weight_bytes(p, pick_dtype(cfg.dtype, pick_device(cfg.device))) for role, p in paths.items()}
    known = [b for b in sizes.values() if b is not None]
    total = sum(known) if len(known) == len(sizes) else None
    budget = gpu_max_memory(cfg.gpu_memory_fraction) if n_gpus else {}
    device_map = choose_device_map(cfg.device_map, n_gpus, min(budget.values(), default=None), total)
    if device_map is None or not budget:
        return device_map, None  # on CPU accelerate places everything in host RAM by itself
    shares = {role: (b / total if total else 1 / len(sizes)) for role, b in sizes.items()}
    max_memory = {role: {gpu: int(free * share) for gpu, free in budget.items()} for role, share in shares.items()}
    log.info("sharding over %d GPU(s), weights %s bytes, max_memory %s", n_gpus, sizes, max_memory)
    return device_map, max_memory


def vllm_unavailable() -> str | None:
    """Why vLLM cannot run here, or None when it can."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "vllm is not installed"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


def choose_backend(cfg: GenerateConfig) -> Literal["hf", "vllm"]:
    """The backend `atlantis generate` uses; `auto` falls back to hf with one log line saying why."""
    if cfg.backend == "hf":
        return "hf"
    if cfg.is_proxy:
        if cfg.backend == "vllm":
            raise GenerateError("backend=vllm cannot proxy-tune (Eq. 9 combines three models' logits): use hf")
        log.info("backend hf: proxy-tuning combines three models' logits at every step, which vLLM does not do")
        return "hf"
    why = vllm_unavailable()
    if why is None:
        return "vllm"
    if cfg.backend == "vllm":
        raise GenerateError(f"backend=vllm asked for, but {why}")
    log.info("backend hf: %s", why)
    return "hf"


def load_decoder(cfg: GenerateConfig) -> Decoder:
    if choose_backend(cfg) == "vllm":
        return VllmDecoder.from_config(cfg)
    device_map, max_memory = placement(cfg)
    if cfg.is_proxy:
        return ProxyModel.from_pretrained(
            str(cfg.large),
            str(cfg.small),
            str(cfg.ref),
            alpha=cfg.alpha,
            template=cfg.template,
            base_template=cfg.base_template,
            dtype=cfg.dtype,
            device=cfg.device,
            trust_remote_code=cfg.trust_remote_code,
            device_map=device_map,
            max_memory=max_memory,
        )
    return SingleModel.from_pretrained(
        str(cfg.model),
        template=cfg.template,
        dtype=cfg.dtype,
        device=cfg.device,
        trust_remote_code=cfg.trust_remote_code,
        device_map=device_map,
        max_memory=(max_memory or {}).get("model"),
    )


# ------------------------------------------------------------------------------------------------- vLLM


class VllmDecoder:
    """One model through vLLM (tensor parallel over the visible GPUs), with the HF path's prompts and stops.

    Prompts are rendered with the same template and encoded as the HF path does (passed as token ids, so vLLM
    adds no second BOS); each question keeps its own temperature and seed; generation stops at every EOS, the
    template's end-of-turn token and the stop strings. Answers come back as `Generation`s, so the FastChat
    answer file is written exactly as on the HF path.
    """

    def __init__(self, llm: Any, sampling_params: Any, tokenizer: Any, template: str, stop_ids: set[int]):
        self.llm = llm
        self.sampling_params = sampling_params  # vllm.SamplingParams (a parameter, so tests can pass a fake)
        self.tokenizer = tokenizer
        self.template = template
        eot = end_of_turn(tokenizer, template)
        self.stop_token_ids = sorted(stop_ids | set(eot.token_ids))
        self.stop_strings = (eot.stop_string,) if eot.stop_string else ()
        log.info("vLLM generation stops at ids %s and the text %s", self.stop_token_ids, list(self.stop_strings))

    @classmethod
    def from_config(cls, cfg: GenerateConfig) -> VllmDecoder:
        import vllm
        from transformers import GenerationConfig

        path = str(cfg.model)
        tok = load_tokenizer(path, cfg.trust_remote_code)
        _, template = resolve_template(tok, cfg.template)
        try:
            gen_cfg = GenerationConfig.from_pretrained(path)
        except OSError:  # no generation_config.json: the tokenizer's EOS alone
            gen_cfg = None
        stop_ids = eos_token_ids(tok, gen_cfg)
        llm = vllm.LLM(
            model=path,
            tokenizer=path,
            tensor_parallel_size=max(torch.cuda.device_count(), 1),
            dtype=str(pick_dtype(cfg.dtype, torch.device("cuda"))).removeprefix("torch."),
            seed=cfg.seed,
            trust_remote_code=cfg.trust_remote_code,
            gpu_memory_utilization=cfg.gpu_memory_fraction,
        )
        return cls(llm, vllm.SamplingParams, tok, template, stop_ids)

    def generate(
        self,
        prompts: Sequence[Sequence[Mapping[str, str]]],
        *,
        max_new_tokens: int,
        temperature: Sequence[float],
        top_p: float,
        seed: Sequence[int],
        stop: Sequence[str],
    ) -> list[Generation]:
        ids = []
        for msgs in prompts:
            text = self.tokenizer.apply_chat_template(
                [dict(m) for m in msgs], chat_template=self.template, tokenize=False, add_generation_prompt=True
            )
            ids.append({"prompt_token_ids": encode_prompt(self.tokenizer, text)})
        params = [
            self.sampling_params(
                n=1,
                temperature=0.0 if t < GREEDY_BELOW else t,
                top_p=top_p,
                max_tokens=max_new_tokens,
                seed=s,
                stop=[x for x in (*stop, *self.stop_strings) if x],
                stop_token_ids=self.stop_token_ids,
                skip_special_tokens=True,
            )
            for t, s in zip(temperature, seed)
        ]
        outs = self.llm.generate(ids, sampling_params=params, use_tqdm=False)
        gens = []
        for out in outs:
            best = out.outputs[0]
            # vLLM says "stop" for EOS, stop tokens and stop strings alike; stop_reason is the string for the last
            finish = "stop" if isinstance(best.stop_reason, str) else "eos"
            finish = "length" if best.finish_reason == "length" else finish
            gens.append(Generation(text=best.text, token_ids=list(best.token_ids), finish_reason=finish))
        return gens


# ----------------------------------------------------------------------------------------------- main


def generate(cfg: GenerateConfig, decoder: Decoder | None = None) -> Path:
    """Answer every question of `cfg.questions` not yet in `cfg.out`; returns the answers file.

    `decoder` reuses models already loaded (tests, notebooks); by default they are loaded from the config.
    """
    out = Path(cfg.out)
    model_id = str(cfg.model_id)
    for spec in [cfg.model] if not cfg.is_proxy else [cfg.large, cfg.small, cfg.ref]:
        check_model_source(str(spec), cfg.trust_remote_code)  # before reading anything else
    questions = load_questions(cfg.questions, cfg.limit)
    if cfg.overwrite and out.exists():
        out.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out, model_id)
    _check_settings(cfg, out, resuming=out.exists())
    todo = [q for q in questions if str(q.question_id) not in done]
    if done:
        log.info("resuming %s: %d of %d questions already answered", out, len(questions) - len(todo), len(questions))
    if not todo:
        log.info("%s: nothing to do", out)
        return out
    decoder = decoder if decoder is not None else load_decoder(cfg)
    with out.open("a", encoding="utf-8") as fh, tqdm(total=len(todo), desc="generate", unit="question") as bar:
        for b in range(0, len(todo), cfg.batch_size):
            batch = todo[b : b + cfg.batch_size]
            for q, answers in zip(batch, answer_batch(decoder, batch, cfg)):
                # One write per line, flushed: a killed run leaves at most one cut line, dropped on resume.
                fh.write(json.dumps(answer_record(model_id, q, answers), ensure_ascii=False) + "\n")
                fh.flush()
            bar.update(len(batch))
    log.info("wrote %d answers to %s (model_id %s)", len(todo), out, model_id)
    return out
