"""`atlantis score` + `atlantis select` against the released IFD and Superfiltering code, transcribed.

The two functions below transcribe tianyi-lab/Cherry_LLM@01fac8d (`cherry_seletion/data_analysis.py`
`get_perplexity_and_embedding_part_text` and the `--mod cherry` branch; `data_by_IFD.py` `get_loss_part_text`, the
filter and the count) and tianyi-lab/Superfiltering@f0764af (`code_ifd/data_analysis.py`, `put_analysis_to_data.py`,
`select_data.py`), run on the tests' tiny models. One generalisation: Cherry's direct pass keeps
`max_length - instruct_len + 4` tokens, 4 being LLaMA's length of `<s>### Response:`; here it is that prefix's
length under the test tokenizer (the constant's meaning: the direct pass holds as many response tokens as the
conditioned one). Superfiltering's `int(52002 * rate)` (Alpaca's size) is the data's size here.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_jsonl
from transformers import AutoModelForCausalLM

from atlantis.data import DataConfig
from atlantis.models import load_tokenizer
from atlantis.render import RenderConfig
from atlantis.scoring import ScoreConfig, score
from atlantis.selection import SelectConfig, select

PROMPT_NO_INPUT = (  # Cherry_LLM PROMPT_DICT["prompt_no_input"], verbatim
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "small",
    "birds",
    "sing",
    "about",
    "rivers",
    "and",
    "stone",
]


def pairs(n: int = 14) -> list[tuple[str, str]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        ins = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9))))
        # some outputs are long enough to be cut at max_length: the same-span rule is exercised
        out_words = rng.choice(WORDS, size=int(rng.integers(2, 40 if i % 3 else 8)))
        out.append((f"Write about {ins}.", " ".join(out_words).capitalize() + "."))
    return out


def part_text_losses(tok, model, text, target_span, max_length):
    """Cherry_LLM get_perplexity_and_embedding_part_text: token losses over the whole (truncated) sequence."""
    input_ids = tok.encode(text, return_tensors="pt", truncation=True, max_length=max_length)
    start_index = text.rfind(target_span)
    start_token = len(tok.encode(text[:start_index]))
    end_token = input_ids.shape[1]
    labels = input_ids.clone()
    labels[0, :start_token] = -100
    with torch.no_grad():
        outputs = model(input_ids, labels=labels)
    losses = []
    for i in range(1, end_token):
        log_prob_dist = torch.log_softmax(outputs.logits[0, i - 1], -1)
        losses.append(float(-log_prob_dist[input_ids[0, i]]))
    return outputs.loss, losses


def cherry_ifd(tok, model, data, max_length, rate):
    """data_analysis.py (--prompt alpaca --mod cherry) + data_by_IFD.py: {index: IFD} kept, and the selection."""
    prefix_len = len(tok.encode("### Response:"))  # 4 under LLaMA's tokenizer: the `+4`
    mean_rate_list, ifd = [], {}
    for i, (instruct_i, output_i) in enumerate(data):
        direct_answer_text = "### Response:" + output_i
        promt_to_use = PROMPT_NO_INPUT.format_map({"instruction": instruct_i})
        whole_text = promt_to_use + output_i
        instruct_i_len = tok.encode(promt_to_use, return_tensors="pt", truncation=True, max_length=max_length).shape[1]
        if max_length - instruct_i_len <= 0:
            continue
        _, loss_1_list = part_text_losses(
            tok, model, direct_answer_text, output_i, max_length - instruct_i_len + prefix_len
        )
        _, loss_2_list = part_text_losses(tok, model, whole_text, output_i, max_length)

        def get_loss_part_text(text, target_span, max_len, loss_list_):
            input_ids = tok.encode(text, return_tensors="pt", truncation=True, max_length=max_len)
            start_token = len(tok.encode(text[: text.rfind(target_span)]))
            end_token_real = input_ids.shape[1]
            return end_token_real - start_token, np.array(loss_list_[start_token - 1 : end_token_real - 1])

        len_1, loss_list_1 = get_loss_part_text(
            direct_answer_text, output_i, max_length - instruct_i_len + prefix_len, loss_1_list
        )
        len_2, loss_list_2 = get_loss_part_text(whole_text, output_i, max_length, loss_2_list)
        if len_1 <= 0 or len_2 <= 0 or instruct_i_len + len_1 > max_length:
            continue
        mean_rate = loss_list_2.mean() / loss_list_1.mean()
        if mean_rate > 1:
            continue
        mean_rate_list.append((mean_rate, i))
        ifd[i] = mean_rate
    mean_rate_list = sorted(mean_rate_list)
    sample_number = int(len(mean_rate_list) * rate)
    return ifd, {i for _, i in mean_rate_list[-sample_number:]}


def superfiltering_ifd(tok, model, data, max_length, rate):
    """code_ifd/data_analysis.py (--prompt none) + put_analysis_to_data.py + select_data.py."""
    ifd = {}
    for i, (instruct_i, output_i) in enumerate(data):
        whole_text = instruct_i + "\n" + output_i
        instruct_i_len = tok.encode(instruct_i + "\n", return_tensors="pt", truncation=True, max_length=max_length)
        instruct_i_len = instruct_i_len.shape[1]
        ids = tok.encode(output_i, return_tensors="pt", truncation=True, max_length=max_length - instruct_i_len + 1)
        with torch.no_grad():
            loss_alone = model(ids, labels=ids.contiguous()).loss
        loss_condition, _ = part_text_losses(tok, model, whole_text, output_i, max_length)
        ifd[i] = float(torch.exp(loss_condition)) / float(torch.exp(loss_alone))
    kept = sorted(((i, x) for i, x in ifd.items() if x < 1), key=lambda t: t[1], reverse=True)
    return ifd, {i for i, _ in kept[: int(len(data) * rate)]}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # with a BOS (LLaMA-like) and without (GPT-2-like)
@pytest.mark.parametrize(
    ("method", "passes", "room"),
    [
        (
            "ifd",
            {"cond": {"template": "alpaca"}, "direct": {"template": "alpaca", "direct_prefix": "alpaca"}},
            24,
        ),
        ("superfiltering", {"cond": {"template": "superfiltering"}, "direct": {"template": "superfiltering"}}, 24),
    ],
)
def test_atlantis_select_equals_the_released_code(models, tmp_path, kind, method, passes, room):
    """`room`: response tokens that fit after the longest prompt (max_length = longest prompt + room), so short
    responses fit whole and long ones are cut."""
    data = pairs()
    tok = load_tokenizer(models[kind])
    prompts = [PROMPT_NO_INPUT.format_map({"instruction": x}) if method == "ifd" else x + "\n" for x, _ in data]
    max_length = max(len(tok.encode(p)) for p in prompts) + room
    records = [
        {"id": f"s{i:02d}", "conversations": [{"from": "human", "value": x}, {"from": "gpt", "value": y}]}
        for i, (x, y) in enumerate(data)
    ]
    path = write_jsonl(tmp_path / "data.jsonl", records)
    files = []
    for role, render in passes.items():
        context = "response_only" if role == "direct" else "full"
        out = tmp_path / f"{role}.parquet"
        score(
            ScoreConfig(
                model=models[kind],
                role=role,
                out=str(out),
                data=DataConfig(path=str(path)),
                render=RenderConfig(context=context, max_length=max_length, **render),
            )
        )
        files.append(str(out))
    rate = 0.5
    table, summary = select(SelectConfig(scores=files, out=str(tmp_path / "sel.parquet"), rate=rate, method=method))

    model = AutoModelForCausalLM.from_pretrained(models[kind], dtype=torch.float32).eval()
    upstream = cherry_ifd if method == "ifd" else superfiltering_ifd
    ifd, chosen = upstream(tok, model, data, max_length, rate)

    cond = pd.read_parquet(files[0]).set_index("id")
    assert cond["truncated_cond"].any()  # some responses were cut: the same-span rule mattered
    assert {f"s{i:02d}" for i in chosen} == set(table["id"])
    assert len(chosen) == summary["n_selected"] > 0
    got = table.set_index("id")["ifd"]
    for i in chosen:
        assert got[f"s{i:02d}"] == pytest.approx(ifd[i], rel=1e-5, abs=1e-6)
    if method == "ifd":
        assert summary["n_passing"] == len(ifd)  # Cherry's count is over the samples that pass
    else:
        assert summary["n_total"] == len(data) and summary["n_passing"] == sum(x < 1 for x in ifd.values())
    assert all(math.isfinite(x) for x in ifd.values())
