"""Arena-Hard-Auto's judge prompts, transcribed from the upstream repository, against `atlantis.evals.arena_hard`.

The files below are copied byte for byte from lmarena/arena-hard-auto (formerly lm-sys/arena-hard-auto); each
copy is checked against the git blob id of the upstream file, so a transcription slip fails here, not silently:

- v0.1, the version the paper's Arena-Hard-Auto column used (2024): `config/judge_config.yaml` @
  7f1b7f5dd6ce53e1f8530220ceb452b7019a8056 (blob 11c3ffc378e06861b321291e600576f15b752ffe), read with
  `yaml.safe_load` as gen_judgment.py reads it;
- the v2.0 code base's setting for arena-hard-v0.1: `config/arena-hard-v0.1.yaml` @
  dcc50bef3ce8da62b967a5b707b5b749dd1d3667 (blob 926a7c93b5e2876fb829022c7d6a732fc557a69c), whose template
  names its fields {QUESTION}/{ANSWER_A}/{ANSWER_B}, and the `OG_ARENA_HARD_PROMPT` line of `utils/judge_utils.py`
  @ 9a1d3864b1a4388635b856fdd7eefb2cc8142525 (the system prompt of `JUDGE_SETTINGS["arena-hard-v0.1"]`).
"""

import ast
import hashlib
import re

import yaml

from atlantis.evals import arena_hard as ah
from atlantis.evals.judge import JudgeConfig

# config/judge_config.yaml @ 7f1b7f5d, verbatim
JUDGE_CONFIG_YAML = (
    "name: judgment config file for Arena Hard\n"
    "\n"
    "bench_name: arena-hard-v0.1\n"
    "\n"
    "# Arena Hard default\n"
    "judge_model: gpt-4-1106-preview\n"
    "reference: False # Optional\n"
    "ref_model: null  \n"
    "\n"
    "baseline: True\n"
    "baseline_model: gpt-4-0314\n"
    "\n"
    "pairwise: True\n"
    "temperature: 0\n"
    "max_tokens: 4096\n"
    "\n"
    "regex_pattern: \\[\\[([AB<>=]+)\\]\\]\n"
    "\n"
    'system_prompt: "Please act as an impartial judge and evaluate the quality of the responses '
    "provided by two AI assistants to the user prompt displayed below. You will be given assistant "
    "A's answer and assistant B's answer. Your job is to evaluate which assistant's answer is "
    "better.\\n\\nBegin your evaluation by generating your own answer to the prompt. You must provide "
    "your answers before judging any answers.\\n\\nWhen evaluating the assistants' answers, compare "
    "both assistants' answers with your answer. You must identify and correct any mistakes or "
    "inaccurate information.\\n\\nThen consider if the assistant's answers are helpful, relevant, and "
    "concise. Helpful means the answer correctly responds to the prompt or follows the instructions. "
    "Note when user prompt has any ambiguity or more than one interpretation, it is more helpful and "
    "appropriate to ask for clarifications or more information from the user than providing an "
    "answer based on assumptions. Relevant means all parts of the response closely connect or are "
    "appropriate to what is being asked. Concise means the response is clear and not verbose or "
    "excessive.\\n\\nThen consider the creativity and novelty of the assistant's answers when needed. "
    "Finally, identify any missing important information in the assistants' answers that would be "
    "beneficial to include when responding to the user prompt.\\n\\nAfter providing your explanation, "
    "you must output only one of the following choices as your final verdict with a label:\\n\\n1. "
    "Assistant A is significantly better: [[A>>B]]\\n2. Assistant A is slightly better: [[A>B]]\\n3. "
    "Tie, relatively the same: [[A=B]]\\n4. Assistant B is slightly better: [[B>A]]\\n5. Assistant B "
    'is significantly better: [[B>>A]]\\n\\nExample output: \\"My final verdict is tie: [[A=B]]\\"."\n'
    "\n"
    "prompt_template: [\"<|User Prompt|>\\n{question_1}\\n\\n<|The Start of Assistant A's "
    "Answer|>\\n{answer_1}\\n<|The End of Assistant A's Answer|>\\n\\n<|The Start of Assistant B's "
    "Answer|>\\n{answer_2}\\n<|The End of Assistant B's Answer|>\"]\n"
    "\n"
    "# Add your model below for evaluation\n"
    "model_list:\n"
    "  - gpt-3.5-turbo-0125"
)

# config/arena-hard-v0.1.yaml @ dcc50bef, verbatim
V01_YAML = (
    "judge_model: gpt-4-1106-preview\n"
    "\n"
    "bench_name: arena-hard-v0.1\n"
    "\n"
    "reference: null\n"
    "\n"
    "temperature: 0.0\n"
    "max_tokens: 4096\n"
    "\n"
    "regex_patterns:\n"
    "  - \\[\\[([AB<>=]+)\\]\\]\n"
    "  - \\[([AB<>=]+)\\]\n"
    "\n"
    "prompt_template: \"<|User Prompt|>\\n{QUESTION}\\n\\n<|The Start of Assistant A's "
    "Answer|>\\n{ANSWER_A}\\n<|The End of Assistant A's Answer|>\\n\\n<|The Start of Assistant B's "
    "Answer|>\\n{ANSWER_B}\\n<|The End of Assistant B's Answer|>\"\n"
    "\n"
    "model_list:\n"
    "  - deepseek-r1"
)

# utils/judge_utils.py @ 9a1d3864, the OG_ARENA_HARD_PROMPT line, verbatim
OG_LINE = (
    'OG_ARENA_HARD_PROMPT = "Please act as an impartial judge and evaluate the quality of the '
    "responses provided by two AI assistants to the user prompt displayed below. You will be given "
    "assistant A's answer and assistant B's answer. Your job is to evaluate which assistant's answer "
    "is better.\\n\\nBegin your evaluation by generating your own answer to the prompt. You must "
    "provide your answers before judging any answers.\\n\\nWhen evaluating the assistants' answers, "
    "compare both assistants' answers with your answer. You must identify and correct any mistakes "
    "or inaccurate information.\\n\\nThen consider if the assistant's answers are helpful, relevant, "
    "and concise. Helpful means the answer correctly responds to the prompt or follows the "
    "instructions. Note when user prompt has any ambiguity or more than one interpretation, it is "
    "more helpful and appropriate to ask for clarifications or more information from the user than "
    "providing an answer based on assumptions. Relevant means all parts of the response closely "
    "connect or are appropriate to what is being asked. Concise means the response is clear and not "
    "verbose or excessive.\\n\\nThen consider the creativity and novelty of the assistant's answers "
    "when needed. Finally, identify any missing important information in the assistants' answers "
    "that would be beneficial to include when responding to the user prompt.\\n\\nAfter providing your "
    "explanation, you must output only one of the following choices as your final verdict with a "
    "label:\\n\\n1. Assistant A is significantly better: [[A>>B]]\\n2. Assistant A is slightly better: "
    "[[A>B]]\\n3. Tie, relatively the same: [[A=B]]\\n4. Assistant B is slightly better: [[B>A]]\\n5. "
    'Assistant B is significantly better: [[B>>A]]\\n\\nExample output: \\"My final verdict is tie: '
    '[[A=B]]\\"."'
)


def git_blob_id(text: str) -> str:
    data = text.encode()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_transcriptions_are_the_upstream_files():
    assert git_blob_id(JUDGE_CONFIG_YAML) == "11c3ffc378e06861b321291e600576f15b752ffe"
    assert git_blob_id(V01_YAML) == "926a7c93b5e2876fb829022c7d6a732fc557a69c"


def test_v01_judge_config_prompts_equal_the_modules():
    cfg = yaml.safe_load(JUDGE_CONFIG_YAML)
    assert cfg["system_prompt"] == ah.SYSTEM_PROMPT
    assert cfg["prompt_template"] == [ah.USER_TEMPLATE]
    assert ah.VERDICT_RE.pattern == cfg["regex_pattern"]
    # the sampling and the models the module documents and defaults to
    judge = JudgeConfig()
    assert (judge.temperature, judge.max_tokens) == (cfg["temperature"], cfg["max_tokens"]) == (0, 4096)
    assert (cfg["judge_model"], cfg["baseline_model"], cfg["bench_name"]) == (
        "gpt-4-1106-preview",
        "gpt-4-0314",
        "arena-hard-v0.1",
    )
    assert "judge_config.yaml@7f1b7f5dd6ce53e1f8530220ceb452b7019a8056" in ah.SOURCE["judge_config"]


def test_v2_code_base_has_the_same_v01_prompts():
    """The later code base kept v0.1's prompts: same system prompt; same template up to its field names."""
    og = ast.literal_eval(OG_LINE.split(" = ", 1)[1])
    assert og == ah.SYSTEM_PROMPT
    v01 = yaml.safe_load(V01_YAML)
    names = {"{QUESTION}": "{question_1}", "{ANSWER_A}": "{answer_1}", "{ANSWER_B}": "{answer_2}"}
    assert re.sub("|".join(map(re.escape, names)), lambda m: names[m[0]], v01["prompt_template"]) == ah.USER_TEMPLATE
    assert ah.VERDICT_RE.pattern == v01["regex_patterns"][0]
    assert (v01["temperature"], v01["max_tokens"], v01["judge_model"]) == (0.0, 4096, "gpt-4-1106-preview")


def test_filled_prompt_is_upstreams_format_call():
    """gen_judgment.py fills the template with str.format(question_1=..., answer_1=..., answer_2=...)."""
    cfg = yaml.safe_load(JUDGE_CONFIG_YAML)
    want = cfg["prompt_template"][0].format(question_1="Q?", answer_1="base", answer_2="model")
    msgs = ah.game_messages("Q?", "base", "model")
    assert msgs == [{"role": "system", "content": cfg["system_prompt"]}, {"role": "user", "content": want}]
