"""TruthfulQA and the Open LLM Leaderboard 2 through lm-evaluation-harness, for a model or a proxy-tuned triple.

The paper evaluates "knowledge & understanding" with lm-evaluation-harness (§3.2): TruthfulQA MC1/MC2 and the
Open LLM Leaderboard 2 (BBH, GPQA, IFEval, MATH-Hard, MMLU-Pro, MuSR). `run(cfg)` calls lm-eval's
`simple_evaluate` and writes one JSON: {"model", "tasks", "metrics", "lm_eval", "provenance"}, where `metrics`
is flat and in percent, as the paper's tables print, and `lm_eval` is lm-eval's own results (configs, versions,
n-shot, its run config).

Task profiles (`tasks=`, names may be mixed with any lm-eval task or group name):

- `world`: lm-eval's *installed* `truthfulqa_mc1` / `truthfulqa_mc2` definitions (its QA-primer prompt, choices,
  `process_results`, metrics: loaded from the YAML the TaskManager indexes, not copied) with the tiny world's
  `eval_truthfulqa.jsonl` as data (`world_truthfulqa_mc1/2`, reported as `truthfulqa_mc1/2_lm_eval_prompt`);
  the same installed definitions with the world's own prompt instead (`world_truthfulqa_mc1/2_qa`, reported as
  `truthfulqa_mc1/2`: 0-shot, no primer, context = the question as the world's models read it, "Q: zorb color?",
  continuation = the stored choice, " blue.", exactly the tokens `atlantis.world.metrics` scores); and
  `world_sums` (tasks/world_sums.yaml). Runs offline. The world's models read 128 positions and never saw
  lm-eval's ~500-token "Q: ...\nA:" primer, so the verbatim prompt scores them near chance.
- `paper`: `truthfulqa_mc1`, `truthfulqa_mc2` and the `leaderboard` group with each task's own settings
  (few-shot counts, generation settings) as lm-eval ships them. Their data comes from the Hub (a cluster job).
- `truthfulqa_local`: lm-eval's installed `truthfulqa_mc1` / `truthfulqa_mc2` definitions unchanged (QA primer,
  choices, MC2's `process_results`, metrics) on a local file in the Hub set's `multiple_choice` format
  (`truthfulqa=FILE`: question, mc1_targets, mc2_targets; `atlantis smoke-data` writes one from TruthfulQA.csv),
  reported as `truthfulqa_mc1/2`: the paper's TruthfulQA protocol where the Hub is out of reach (the smoke profile).

Chat template: off by default (`apply_chat_template=false`). The paper only says it used lm-evaluation-harness's
scripts, whose default is no chat template; the HF leaderboard ran chat models with `--apply_chat_template
--fewshot_as_multiturn`. The models here are base models fine-tuned on a chat format, so both are defensible:
set `apply_chat_template=true fewshot_as_multiturn=true` for the leaderboard's chat protocol.

Leaderboard numbers (`leaderboard_scores`): each task's score is normalised as the leaderboard does (subtract
the random baseline 1/num_choices, rescale to 0-100, clip at 0; per subtask for BBH and MuSR, then averaged) and
`open_llm_leaderboard_2` is the mean of the six. The unnormalised means are kept beside them (`*_raw`): the
paper's Table 2 values (32-38 for 7-13B models) are close to the raw mean, not to the normalised one.

Proxy-tuning (paper Eq. 9, Table 7) goes through lm-eval's model registry as `atlantis-proxy` (`ProxyLM`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lm_eval.models  # noqa: F401  (see below)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from atlantis import provenance
from atlantis.config import field
from atlantis.data import iter_lines, parse_json_line
from atlantis.log import get_logger

log = get_logger(__name__)

TASKS_DIR = Path(__file__).parent / "tasks"

PAPER_TASKS = ("truthfulqa_mc1", "truthfulqa_mc2", "leaderboard")
LM_EVAL_TQA = ("truthfulqa_mc1", "truthfulqa_mc2")  # lm-eval's installed definitions the local profiles reuse
WORLD_TASKS = (
    "world_truthfulqa_mc1",
    "world_truthfulqa_mc2",
    "world_truthfulqa_mc1_qa",
    "world_truthfulqa_mc2_qa",
    "world_sums",
)
LOCAL_TASKS = ("truthfulqa_mc1_local", "truthfulqa_mc2_local")
PROFILES = {"paper": PAPER_TASKS, "world": WORLD_TASKS, "truthfulqa_local": LOCAL_TASKS}
# tasks that reuse only lm-eval's TruthfulQA definitions: a task index of that one folder is enough
TRUTHFULQA_ONLY = frozenset(WORLD_TASKS) | frozenset(LOCAL_TASKS)

# Random baselines of the Open LLM Leaderboard 2, https://huggingface.co/docs/leaderboards/open_llm_leaderboard/
# normalization ("Scores Normalization": lower bound 1/num_choices; MATH and IFEval have 0). The BBH and MuSR
# choice counts are those of lm-eval's leaderboard task YAMLs (a test checks them against the installed ones).
BBH_CHOICES = {
    "boolean_expressions": 2,
    "causal_judgement": 2,
    "date_understanding": 6,
    "disambiguation_qa": 3,
    "formal_fallacies": 2,
    "geometric_shapes": 11,
    "hyperbaton": 2,
    "logical_deduction_five_objects": 5,
    "logical_deduction_seven_objects": 7,
    "logical_deduction_three_objects": 3,
    "movie_recommendation": 6,
    "navigate": 2,
    "object_counting": 19,
    "penguins_in_a_table": 5,
    "reasoning_about_colored_objects": 18,
    "ruin_names": 6,
    "salient_translation_error_detection": 6,
    "snarks": 2,
    "sports_understanding": 2,
    "temporal_sequences": 4,
    "tracking_shuffled_objects_five_objects": 5,
    "tracking_shuffled_objects_seven_objects": 7,
    "tracking_shuffled_objects_three_objects": 3,
    "web_of_lies": 2,
}
MUSR_CHOICES = {"murder_mysteries": 2, "object_placements": 5, "team_allocation": 3}
LEADERBOARD = (
    "leaderboard_bbh",
    "leaderboard_gpqa",
    "leaderboard_ifeval",
    "leaderboard_math_hard",
    "leaderboard_mmlu_pro",
    "leaderboard_musr",
)


class LmEvalError(ValueError):
    """An lm-eval run cannot be set up as asked, or its results lack a metric we report."""


# ------------------------------------------------------------------------------------------ config


@dataclass
class LmEvalConfig:
    out: str = field(help="Output JSON: the model, flat metrics in percent, and lm-eval's results.")
    model: str | None = field(None, help="Model folder or Hub id (lm-eval's `hf` model). Or give the proxy triple.")
    proxy_large: str | None = field(None, help="Proxy-tuning (Eq. 9): the large base model p_b^L.")
    proxy_small: str | None = field(None, help="Proxy-tuning: the small base model p_b^S.")
    proxy_ref: str | None = field(None, help="Proxy-tuning: the reference model p_r (p_b^S fine-tuned).")
    alpha: float = field(1.0, help="Proxy-tuning: logits s_L + alpha (s_r - s_S); the paper uses 1.")
    template: str = field("auto", help="Proxy: chat template for apply_chat_template ('auto': the reference's).")
    tasks: list[str] = field(
        default_factory=lambda: ["world"],
        help="lm-eval task/group names, or the profiles 'world' (offline, tiny world) and 'paper'.",
    )
    world: str = field("results/tiny/world", help="Tiny-world folder (data/eval_truthfulqa.jsonl, eval_skill.jsonl).")
    truthfulqa: str | None = field(
        None,
        help="TruthfulQA in the Hub set's multiple_choice format (JSON/JSONL records: question, mc1_targets, "
        "mc2_targets) for the profile 'truthfulqa_local' (lm-eval's own truthfulqa_mc1/mc2 on this file).",
    )
    batch_size: int = field(16, help="Requests per forward pass.")
    device: str = field("cpu", help="Torch device (cpu, cuda, cuda:0).")
    parallelize: bool | None = field(
        None,
        help="Shard the model across the visible GPUs (lm-eval's hf model_args parallelize=True, accelerate's "
        "device_map='auto'): for models that do not fit one GPU. None: on when device is cuda and more than one GPU "
        "is visible. The proxy triple ignores it (it loads each model on `device`).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        "auto", help="Weights' dtype; auto: float32 on CPU, bfloat16 on GPU."
    )
    limit: float | None = field(None, help="Documents per task (an integer), or a fraction below 1; None: all.")
    num_fewshot: int | None = field(None, help="Override every task's few-shot count; None: each task's own.")
    apply_chat_template: bool = field(False, help="Render prompts with the model's chat template (lm-eval's flag).")
    fewshot_as_multiturn: bool = field(False, help="Few-shot examples as chat turns (needs apply_chat_template).")
    system_instruction: str | None = field(None, help="System message prepended to every prompt (lm-eval's flag).")
    log_samples: bool = field(False, help="Also write every scored request to <out>.samples.jsonl.")
    trust_remote_code: bool = field(False, help="Allow model folders' custom code.")

    def __post_init__(self):
        proxy = [self.proxy_large, self.proxy_small, self.proxy_ref]
        if any(p is not None for p in proxy) and not all(p is not None for p in proxy):
            raise ValueError("proxy-tuning needs proxy_large, proxy_small and proxy_ref (all three)")
        if (self.model is None) == (self.proxy_large is None):
            raise ValueError("give either model or the proxy triple (proxy_large, proxy_small, proxy_ref)")
        if not self.tasks:
            raise ValueError("tasks is empty")
        if self.model is not None and len(self.model.split(",")) != len(self.out.split(",")):
            raise ValueError("several models (model=a,b) need as many outputs (out=a.json,b.json), in order")
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError("fewshot_as_multiturn needs apply_chat_template=true (lm-eval's rule)")
        if self.limit is not None and not self.limit > 0:
            raise ValueError(f"limit must be positive, got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be finite, got {self.alpha}")
        if self.parallelize and not self.device.startswith("cuda"):
            raise ValueError(f"parallelize shards a model across GPUs; device is {self.device!r} (use device=cuda)")

    @property
    def is_proxy(self) -> bool:
        return self.proxy_large is not None


# ------------------------------------------------------------------------------------------- tasks


def _load_task_yaml(path: str | Path) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's loader: resolves `include:` and `!function`

    return load_yaml(path, resolve_func=True)


def local_source(data_file: str | Path) -> dict[str, Any]:
    """Where a task's documents come from, replaced by a local JSON/JSONL file (its only split: `test`)."""
    return {
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}},
        "training_split": None,
        "validation_split": None,
        "test_split": "test",
    }


def reuse_task(task_manager, name: str, data_file: str | Path, task: str, **overrides: Any) -> dict[str, Any]:
    """lm-eval's installed definition of task `name` (prompt, choices, `process_results`, metrics: loaded from the
    YAML the TaskManager indexes, not copied) with only its documents replaced by `data_file`, renamed `task`, and
    `overrides` applied. The definition's `tag` is dropped, else the copy would join the real benchmark's tag."""
    entry = task_manager.task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise LmEvalError(f"lm-eval {_lm_eval_version()} has no task {name!r} to reuse")
    cfg = _load_task_yaml(entry.yaml_path)
    cfg.pop("tag", None)
    metadata = {**cfg.get("metadata", {}), "reuses": str(entry.yaml_path), **overrides.pop("metadata", {})}
    cfg.update(local_source(data_file), task=task, metadata=metadata, **overrides)  # provenance in lm-eval's record
    return cfg


def world_task_configs(world: str | Path, task_manager) -> list[dict[str, Any]]:
    """The tiny world's task configs: lm-eval's own TruthfulQA MC1/MC2 on the world's data, with lm-eval's prompt
    and with the world's own prompt (`_qa`), and its sums."""
    from atlantis.evals.tasks.world import truthfulqa_docs

    data = Path(world) / "data"
    tqa, sums = data / "eval_truthfulqa.jsonl", data / "eval_skill.jsonl"
    for f in (tqa, sums):
        if not f.is_file():
            raise LmEvalError(f"{f} does not exist: build the world first (`atlantis world build out={world}`)")

    # The installed definitions with the Hub's `validation` split replaced by the world's file; the world writes
    # its records in its own format, which `truthfulqa_docs` maps to the Hub set's.
    configs = [reuse_task(task_manager, n, tqa, f"world_{n}", process_docs=truthfulqa_docs) for n in LM_EVAL_TQA]
    # The same definitions (choices, gold index 0, MC2's `process_results` and every metric as installed) with the
    # world's prompt: the question text alone, as qa.jinja renders a user turn, and each choice as stored
    # (" blue.") with no delimiter added. lm-eval then scores BOS + question + choice, the choice's tokens split
    # off the whole string's: the tokens `atlantis.world.metrics.continuation_logliks` scores.
    qa_configs = []
    for name in LM_EVAL_TQA:
        qa = reuse_task(
            task_manager,
            name,
            tqa,
            f"world_{name}_qa",
            doc_to_text="{{question}}",
            target_delimiter="",
            num_fewshot=0,
            metadata={"prompt": "world (qa.jinja)"},
        )
        qa.pop("process_docs", None)  # the documents as the world wrote them
        qa_configs.append(qa)
    sums_cfg = _load_task_yaml(TASKS_DIR / "world_sums.yaml")
    sums_cfg["dataset_kwargs"] = {"data_files": {"test": str(sums.resolve())}}
    return [*configs, *qa_configs, sums_cfg]


def local_truthfulqa_configs(data_file: str | Path | None, task_manager) -> list[dict[str, Any]]:
    """lm-eval's truthfulqa_mc1/mc2 exactly as installed, on a local file in the Hub set's multiple_choice format."""
    if not data_file:
        raise LmEvalError("the profile truthfulqa_local needs truthfulqa=FILE (e.g. from `atlantis smoke-data`)")
    path = Path(data_file)
    if not path.is_file():
        raise LmEvalError(f"truthfulqa={path}: no such file")
    for lineno, line in iter_lines(path) if path.suffix == ".jsonl" else ():
        if not line.strip():
            continue
        rec = parse_json_line(line, path, lineno)
        for key in ("question", "mc1_targets", "mc2_targets"):
            if key not in rec:  # lm-eval would fail later, inside a Jinja template, without saying where
                raise LmEvalError(f"{path}:{lineno}: no field {key!r} (the Hub set's multiple_choice format)")
    return [reuse_task(task_manager, n, path, f"{n}_local") for n in LM_EVAL_TQA]


def resolve_tasks(
    tasks: Sequence[str], world: str | Path, task_manager, truthfulqa: str | Path | None = None
) -> list[str | dict[str, Any]]:
    """Expand the profiles; every other name must be known to lm-eval (checked here, before any model loads)."""
    names: list[str] = []
    for t in tasks:
        names.extend(PROFILES.get(t, (t,)))
    out: list[str | dict[str, Any]] = []
    world_cfgs = local_cfgs = None
    for name in dict.fromkeys(names):  # keep order, drop repeats
        if name in WORLD_TASKS:
            world_cfgs = world_cfgs or {c["task"]: c for c in world_task_configs(world, task_manager)}
            out.append(world_cfgs[name])
        elif name in LOCAL_TASKS:
            local_cfgs = local_cfgs or {c["task"]: c for c in local_truthfulqa_configs(truthfulqa, task_manager)}
            out.append(local_cfgs[name])
        elif name in task_manager.task_index:
            out.append(name)
        else:
            raise LmEvalError(f"unknown lm-eval task or group {name!r} (profiles: {sorted(PROFILES)})")
    return out


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm-eval")


# ----------------------------------------------------------------------------------------- metrics


def normalize_within_range(value: float, lower: float, upper: float = 1.0) -> float:
    """The leaderboard's normalisation, in percent: 0 at the random baseline (and below), 100 at the maximum."""
    return 0.0 if value < lower else (value - lower) / (upper - lower) * 100.0


def _get(results: Mapping[str, Mapping[str, Any]], task: str, metric: str) -> float:
    try:
        return float(results[task][f"{metric},none"])
    except KeyError:
        raise LmEvalError(f"lm-eval results have no {metric!r} for {task!r}") from None


def leaderboard_scores(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Open LLM Leaderboard 2 scores (percent) from lm-eval's `results` dict, for the tasks present.

    `<task>`: the leaderboard's normalised score; `<task>_raw`: lm-eval's own number (×100). IFEval is the mean of
    prompt- and instruction-level strict accuracy (lower bound 0, so raw = normalised); MATH-Hard is exact match
    (lower bound 0); BBH and MuSR normalise each subtask and average them unweighted; GPQA and MMLU-Pro are
    normalised once with 4 and 10 choices. `open_llm_leaderboard_2` (`_raw`): the mean of the six, when all six
    are present.
    """
    out: dict[str, float] = {}
    if "leaderboard_bbh" in results:
        sub = [_get(results, f"leaderboard_bbh_{t}", "acc_norm") for t in BBH_CHOICES]
        out["leaderboard_bbh"] = sum(normalize_within_range(v, 1 / BBH_CHOICES[t]) for v, t in zip(sub, BBH_CHOICES))
        out["leaderboard_bbh"] /= len(sub)
        out["leaderboard_bbh_raw"] = 100 * _get(results, "leaderboard_bbh", "acc_norm")
    if "leaderboard_gpqa" in results:
        raw = _get(results, "leaderboard_gpqa", "acc_norm")
        out["leaderboard_gpqa"], out["leaderboard_gpqa_raw"] = normalize_within_range(raw, 1 / 4), 100 * raw
    if "leaderboard_ifeval" in results:
        score = 50 * (
            _get(results, "leaderboard_ifeval", "prompt_level_strict_acc")
            + _get(results, "leaderboard_ifeval", "inst_level_strict_acc")
        )
        out["leaderboard_ifeval"] = out["leaderboard_ifeval_raw"] = score
    if "leaderboard_math_hard" in results:
        raw = _get(results, "leaderboard_math_hard", "exact_match")
        out["leaderboard_math_hard"] = out["leaderboard_math_hard_raw"] = 100 * raw
    if "leaderboard_mmlu_pro" in results:
        raw = _get(results, "leaderboard_mmlu_pro", "acc")
        out["leaderboard_mmlu_pro"], out["leaderboard_mmlu_pro_raw"] = normalize_within_range(raw, 1 / 10), 100 * raw
    if "leaderboard_musr" in results:
        sub = [_get(results, f"leaderboard_musr_{t}", "acc_norm") for t in MUSR_CHOICES]
        out["leaderboard_musr"] = sum(normalize_within_range(v, 1 / MUSR_CHOICES[t]) for v, t in zip(sub, MUSR_CHOICES))
        out["leaderboard_musr"] /= len(sub)
        out["leaderboard_musr_raw"] = 100 * _get(results, "leaderboard_musr", "acc_norm")
    if all(t in out for t in LEADERBOARD):
        out["open_llm_leaderboard_2"] = sum(out[t] for t in LEADERBOARD) / len(LEADERBOARD)
        out["open_llm_leaderboard_2_raw"] = sum(out[f"{t}_raw"] for t in LEADERBOARD) / len(LEADERBOARD)
    return out


def metrics_from_results(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """One flat dict in percent: truthfulqa_mc1/mc2, world_sums, and the leaderboard's scores.

    `truthfulqa_mc1/2` is lm-eval's task on the Hub's data (`paper`), or on a local copy (`truthfulqa_local`), or,
    without either, the world's version with the world's prompt (`world_truthfulqa_mc1/2_qa`: the same task and
    metrics on other data, asked as the world's models were trained). The world's data under lm-eval's own prompt
    (`world_truthfulqa_mc1/2`) reports as `truthfulqa_mc1/2_lm_eval_prompt`; a local or `_qa` result whose column
    an earlier one occupies keeps its task name.
    """
    out: dict[str, float] = {}
    for task in ("truthfulqa_mc1", "truthfulqa_mc2"):
        if task in results:
            out[task] = 100 * _get(results, task, "acc")
        local = f"{task}_local"
        if local in results:  # the same task on a local copy of the data: the paper's column, unless the Hub's ran
            out[local if task in out else task] = 100 * _get(results, local, "acc")
        qa = f"world_{task}_qa"
        if qa in results:
            out[qa if task in out else task] = 100 * _get(results, qa, "acc")
        if f"world_{task}" in results:
            out[f"{task}_lm_eval_prompt"] = 100 * _get(results, f"world_{task}", "acc")
    if "world_sums" in results:
        out["world_sums"] = 100 * _get(results, "world_sums", "exact_match")
    out.update(leaderboard_scores(results))
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise LmEvalError(f"non-finite metrics {bad}")
    return out


# --------------------------------------------------------------------------------- proxy-tuned LM


# lm-eval 0.4.13 fills its model registry lazily, only while the registry is empty (`get_model`): registering
# "atlantis-proxy" first would hide "hf" and the other built-in models. The `import lm_eval.models` at the top of
# this module fills it before the decorator below runs.
@register_model("atlantis-proxy")
class ProxyLM(TemplateLM):
    """A proxy-tuned model (paper Eq. 9: softmax(s_L + α (s_r − s_S))) as an lm-eval model.

    `--model atlantis-proxy --model_args large=DIR,small=DIR,ref=DIR,alpha=1.0` once this module is imported.
    Text is tokenised exactly as lm-eval's `hf` model does (TemplateLM's context/continuation split, the same
    BOS rule and left truncation to the context window), with the reference model's tokenizer, which
    `ProxyModel` has checked to be identical to the other two; all three models then read the same token ids.
    """

    def __init__(
        self,
        large: str,
        small: str,
        ref: str,
        alpha: float = 1.0,
        template: str = "auto",
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int | str | None = 16,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        seed: int = 1234,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        from lm_eval.models.utils import resolve_max_length

        from atlantis.proxy import ProxyModel

        self.decoder = ProxyModel.from_pretrained(
            str(large),
            str(small),
            str(ref),
            alpha=float(alpha),
            template=template,
            dtype=dtype,
            device=device or "auto",
            trust_remote_code=bool(trust_remote_code),
        )
        self.tokenizer = self.decoder.tokenizer
        self._device = self.decoder.primary.model.device
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            log.info("atlantis-proxy has no automatic batch size; using 16")
            batch_size = 16
        self.batch_size = int(batch_size)
        # The window every model can read: the smallest of the three (the hf model uses its own config's).
        self._max_length = (
            int(max_length)
            if max_length
            else min(resolve_max_length(c.model.config, c.tokenizer) for c in self.decoder.components)
        )
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self._ref_path = str(ref)

    # -- what TemplateLM needs --------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # As lm-eval's hf model: BOS conditions an empty context, EOS when there is no BOS.
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self._ref_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            kw = {"add_special_tokens": False}  # a chat template wrote BOS already (the hf model's rule)
        ids = self.tokenizer.encode(string, **kw)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        # Left-truncate each (context, continuation) to max_length + 1 tokens as the hf model does, then score
        # the continuations that share one (truncated) context together: `continuation_logprobs_ids` runs one
        # right-padded forward per model for them.
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            if len(continuation) > self.max_length:
                raise LmEvalError(f"a continuation of {len(continuation)} tokens exceeds max_length {self.max_length}")
            whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
            groups.setdefault(tuple(whole[: len(whole) - len(continuation)]), []).append((i, list(continuation)))
        bs = override_bs or self.batch_size
        for context, items in groups.items():
            conts = self.decoder.continuation_logprobs_ids(list(context), [c for _, c in items], batch_size=bs)
            for (i, _), cont in zip(items, conts):
                out[i] = (cont.total, cont.is_greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity-style scoring, with the hf model's disjoint rolling windows (prefix token, max_length)."""
        from lm_eval import utils

        totals = []
        for (string,) in (req.args for req in requests):
            windows = [
                (None, *w)
                for w in map(
                    utils.make_disjoint_window,
                    utils.get_rolling_token_windows(
                        token_list=self.tok_encode(string),
                        prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length,
                        context_len=1,
                    ),
                )
            ]
            total = math.fsum(ll for ll, _ in self._loglikelihood_tokens(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            totals.append(total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        eos = self.tokenizer.decode([self.eot_token_id])
        by_kwargs: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            by_kwargs.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        for rows in by_kwargs.values():
            kwargs = normalize_gen_kwargs(dict(requests[rows[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if max_gen >= self.max_length:
                raise LmEvalError(f"max_gen_toks {max_gen} must be below the context window {self.max_length}")
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            for b in range(0, len(rows), self.batch_size):
                chunk = rows[b : b + self.batch_size]
                prompts = []
                for i in chunk:
                    ids = self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_gen)
                    prompts.append({c.name: ids for c in self.decoder.components})
                gens = self.decoder.generate_ids(
                    prompts,
                    max_new_tokens=max_gen,
                    temperature=temperature,
                    top_p=float(kwargs.get("top_p", 1.0) or 1.0),
                    seed=[self.seed + i for i in chunk],  # a request's sample does not depend on its batch
                    stop=until,
                )
                for i, gen in zip(chunk, gens):
                    text = gen.text
                    for term in until:  # as the hf model: cut at the first stop sequence
                        text = text.split(term)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    # -- chat ---------------------------------------------------------------------------------------------
    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.decoder.primary.template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        # One rendering (the reference's template) read by all three models: the same x in Eq. 9.
        return self.tokenizer.apply_chat_template(
            chat_history,
            chat_template=self.decoder.primary.template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )


# --------------------------------------------------------------------------------------------- run


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def shard(cfg: LmEvalConfig, n_gpus: int) -> bool:
    """Whether the hf model is split across GPUs: as asked, or (unset) when device is cuda and n_gpus > 1."""
    if cfg.parallelize is not None:
        return cfg.parallelize
    return cfg.device.startswith("cuda") and ":" not in cfg.device and n_gpus > 1


def _model_spec(cfg: LmEvalConfig, n_gpus: int | None = None) -> tuple[str, dict[str, Any]]:
    """lm-eval's model name and model_args; `n_gpus`: the visible GPUs (None: ask torch)."""
    from atlantis.models import pick_device, pick_dtype

    dtype = str(pick_dtype(cfg.dtype, pick_device(cfg.device))).removeprefix("torch.")
    if cfg.is_proxy:
        args = {"large": cfg.proxy_large, "small": cfg.proxy_small, "ref": cfg.proxy_ref, "alpha": cfg.alpha}
        args.update(template=cfg.template, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        return "atlantis-proxy", args
    args = {"pretrained": cfg.model, "dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if shard(cfg, visible_gpus() if n_gpus is None else n_gpus):
        # accelerate places the layers over every visible GPU (device_map="auto"); lm-eval then ignores `device`
        args["parallelize"] = True
    return "hf", args


def _public(record: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's results without the per-request samples and without anything that looks like a credential."""
    out = {k: v for k, v in record.items() if k != "samples"}
    run_cfg = dict(out.get("config") or {})
    if isinstance(run_cfg.get("model_args"), dict):
        run_cfg["model_args"] = {
            k: v for k, v in run_cfg["model_args"].items() if not any(s in k.lower() for s in ("token", "key"))
        }
    out["config"] = run_cfg
    return out


def run_all(cfg: LmEvalConfig) -> list[dict[str, Any]]:
    """`atlantis lmeval`: one model, or several (`model=a,b out=a.json,b.json`) in one process, so lm-eval's
    task index and the tasks' documents are built once (the tiny workflow evaluates 40 models)."""
    if cfg.model is None or "," not in cfg.model:
        return [run(cfg)]
    from dataclasses import replace

    from lm_eval.tasks import TaskManager

    first = replace(cfg, model=cfg.model.split(",")[0], out=cfg.out.split(",")[0])
    manager = _task_manager(first) or TaskManager()
    return [
        run(replace(cfg, model=m, out=o), task_manager=manager)
        for m, o in zip(cfg.model.split(","), cfg.out.split(","))
    ]


def _task_manager(cfg: LmEvalConfig):
    """A task index of just lm-eval's TruthfulQA folder when only the world's or the local TruthfulQA tasks are
    asked (~8 s saved a run: they reuse those definitions); None: the full index."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    requested = {n for t in cfg.tasks for n in PROFILES.get(t, (t,))}
    if requested <= TRUTHFULQA_ONLY:
        folder = Path(lm_eval.tasks.__file__).parent / "truthfulqa"
        return TaskManager(include_path=str(folder), include_defaults=False)
    return None


def run(cfg: LmEvalConfig, task_manager=None) -> dict[str, Any]:
    """`atlantis lmeval`: evaluate one model (or proxy triple) with lm-eval; write and return the record.

    task_manager: an `lm_eval.tasks.TaskManager` to reuse (building one indexes every installed task, ~8 s).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    if task_manager is None:
        task_manager = _task_manager(cfg) or TaskManager()
    tasks = resolve_tasks(cfg.tasks, cfg.world, task_manager, cfg.truthfulqa)
    names = [t if isinstance(t, str) else t["task"] for t in tasks]
    model, model_args = _model_spec(cfg)
    limit = int(cfg.limit) if cfg.limit is not None and cfg.limit >= 1 else cfg.limit
    log.info("lm-eval %s: %s on %s", _lm_eval_version(), model_args.get("pretrained") or "proxy", names)
    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        num_fewshot=cfg.num_fewshot,
        batch_size=cfg.batch_size,
        device=cfg.device,
        limit=limit,
        log_samples=cfg.log_samples,
        apply_chat_template=cfg.apply_chat_template,
        fewshot_as_multiturn=cfg.fewshot_as_multiturn,
        system_instruction=cfg.system_instruction,
        task_manager=task_manager,
    )
    if results is None:  # a non-zero rank under a distributed launcher: rank 0 writes
        return {}
    record: dict[str, Any] = {
        "model": cfg.model if not cfg.is_proxy else {k: model_args[k] for k in ("large", "small", "ref", "alpha")},
        "tasks": names,
        "metrics": metrics_from_results(results["results"]),
        "lm_eval": _public(results),
        "atlantis_config": asdict(cfg),
        "provenance": provenance.environment(),
    }
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=handle_non_serializable) + "\n")
    if cfg.log_samples:
        samples = out.with_name(out.name.removesuffix(".json") + ".samples.jsonl")
        with samples.open("w") as fh:
            for task, rows in results.get("samples", {}).items():
                for row in rows:
                    fh.write(json.dumps({"task": task, **row}, default=handle_non_serializable) + "\n")
    log.info("wrote %s: %s", out, {k: round(v, 2) for k, v in record["metrics"].items()})
    return record
