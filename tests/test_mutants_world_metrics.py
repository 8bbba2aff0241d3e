"""The world judge's pairwise verdict and `atlantis world evaluate`'s file (from the mutation survivors of
bench/mutation.py), on the table model of tests/test_world_metrics_reference.py."""

import json
import math

import pytest
import torch
from test_world_metrics_reference import TableDecoder, _table_logliks, evaluated  # noqa: F401 (a fixture)

from atlantis.world import metrics


def test_judge_pair_knows_the_misconception_on_either_side():
    # truth blue, misconception navy: navy rates 2 (confidently wrong), red 1 (anything else), blue 10
    assert metrics.judge_pair(" navy.", " red.", "blue", "navy") == "A"
    assert metrics.judge_pair(" red.", " navy.", "blue", "navy") == "B"
    assert metrics.judge_pair(" navy.", " red.", "blue") == "tie"  # no misconception given: both rate 1
    assert metrics.judge_pair(" blue.", " navy.", "blue", "navy") == "A"
    assert metrics.judge_pair("blue", " blue.", "blue", "navy") == "B"  # 7 (sloppy) < 10


def test_evaluate_to_file_writes_the_model_its_metrics_and_provenance(evaluated, tmp_path):  # noqa: F811
    result, _, _ = evaluated  # the same world and table model (its monkeypatches still hold)
    model = str(tmp_path / "table-model")
    out = tmp_path / "eval" / "m.json"
    cfg = metrics.EvaluateConfig(model=model, out=str(out), world=str(tmp_path / "world"), template="unused.jinja")
    assert metrics.evaluate_to_file(cfg) == out
    assert metrics.evaluate_to_file(cfg) == out  # again: the answers of the first run are replaced, not refused
    record = json.loads(out.read_text())
    assert record["model"] == model and "proxy" not in record
    assert record["metrics"] == pytest.approx(result)
    assert record["metrics"]["judge"] == pytest.approx((2 + 10 + 10 + 1 + 7 + 10) / 6)
    assert record["provenance"]["model"] == model
    # answers beside the output by default: <out without .json>.answers/
    answers = tmp_path / "eval" / "m.answers"
    assert (answers / "eval_open.jsonl").is_file() and (answers / "eval_mtbench.jsonl").is_file()
    for name in ("eval_open", "eval_mtbench"):  # generated greedily, short, with the template asked for
        settings = json.loads((answers / f"{name}.jsonl.settings.json").read_text())
        assert (settings["template"], settings["temperature"], settings["max_new_tokens"]) == ("unused.jinja", 0.0, 8)
    # model_id is written into the answers
    cfg = metrics.EvaluateConfig(
        model=model, out=str(out), world=str(tmp_path / "world"), answers=str(tmp_path / "a2"), model_id="tbl"
    )
    metrics.evaluate_to_file(cfg)
    rows = [json.loads(x) for x in (tmp_path / "a2" / "eval_open.jsonl").read_text().splitlines()]
    assert {r["model_id"] for r in rows} == {"tbl"}


def test_evaluate_to_file_of_a_proxy_records_it(evaluated, tmp_path, monkeypatch):  # noqa: F811
    result, _, _ = evaluated
    monkeypatch.setattr("atlantis.proxy.ProxyModel", lambda *a, **k: TableDecoder())
    monkeypatch.setattr(metrics, "decoder_logliks", lambda decoder, pairs: _table_logliks(None, None, None, pairs))
    model, out = str(tmp_path / "table-model"), tmp_path / "p.json"
    cfg = metrics.EvaluateConfig(
        model=model, out=str(out), world=str(tmp_path / "world"), proxy_small="S", proxy_ref="R"
    )
    metrics.evaluate_to_file(cfg)
    record = json.loads(out.read_text())
    assert record["proxy"] == {"small": "S", "ref": "R", "alpha": 1.0}
    assert record["metrics"] == pytest.approx(result)  # the same table behind the proxy
    with pytest.raises(ValueError, match="needs both proxy_small and proxy_ref"):
        metrics.EvaluateConfig(model=model, out=str(out), proxy_small="S")


class Named:
    """A stand-in model that knows which folder it was loaded from."""

    def __init__(self, path):
        self.path = path

    def eval(self):
        return self


def test_evaluate_hands_each_part_the_right_model_tokenizer_and_template(evaluated, tmp_path, monkeypatch):  # noqa: F811
    """The loaders and decoders are stand-ins that record what they are given: the evaluated model's folder, fp32
    on CPU, its tokenizer and the chat template reach every part; a proxy gets p_L, p_S, p_r and their tokenizers."""
    seen = {"load_model": [], "SingleModel": [], "logliks": set(), "ProxyModel": [], "decoder_logliks": set()}

    def load_model(path, dtype, device, *a, **k):
        seen["load_model"].append((path, dtype, device))
        return Named(path)

    def single(model, tokenizer, template):
        seen["SingleModel"].append((model.path, tokenizer, template))
        return TableDecoder()

    def logliks(model, tokenizer, template, pairs, batch=64):
        seen["logliks"].add((model.path, tokenizer, template))
        return _table_logliks(model, tokenizer, template, pairs)

    def proxy_model(large, small, ref, toks, template):
        seen["ProxyModel"].append((large.path, small.path, ref.path, toks, template))
        decoder = TableDecoder()
        decoder.name = "proxy"
        return decoder

    def decoder_logliks(decoder, pairs, batch=64):
        seen["decoder_logliks"].add(decoder.name)
        return _table_logliks(None, None, None, pairs)

    monkeypatch.setattr("atlantis.models.load_model", load_model)
    monkeypatch.setattr("atlantis.models.load_tokenizer", lambda path, *a, **k: f"tok:{path}")
    monkeypatch.setattr("atlantis.proxy.SingleModel", single)
    monkeypatch.setattr("atlantis.proxy.ProxyModel", proxy_model)
    monkeypatch.setattr(metrics, "continuation_logliks", logliks)
    monkeypatch.setattr(metrics, "decoder_logliks", decoder_logliks)
    from atlantis.world.models import TEMPLATE_PATH

    model, world = str(tmp_path / "table-model"), str(tmp_path / "world")
    fp32_cpu = (torch.float32, torch.device("cpu"))
    out = tmp_path / "new" / "deeper" / "m.json"
    metrics.evaluate_to_file(metrics.EvaluateConfig(model=model, out=str(out), world=world))  # default template
    assert seen["load_model"] == [(model, *fp32_cpu)]
    assert seen["SingleModel"] == [(model, f"tok:{model}", str(TEMPLATE_PATH))]
    assert seen["logliks"] == {(model, f"tok:{model}", str(TEMPLATE_PATH))}
    assert json.loads(out.read_text())["metrics"] == pytest.approx(evaluated[0])

    seen["load_model"].clear()
    cfg = metrics.EvaluateConfig(
        model=model, out=str(tmp_path / "p.json"), world=world, template="T.jinja", proxy_small="S", proxy_ref="R"
    )
    metrics.evaluate_to_file(cfg)
    assert seen["load_model"] == [(model, *fp32_cpu), ("S", *fp32_cpu), ("R", *fp32_cpu)]
    toks = {"large": f"tok:{model}", "small": "tok:S", "ref": "tok:R"}
    assert seen["ProxyModel"] == [(model, "S", "R", toks, "T.jinja")]
    assert seen["decoder_logliks"] == {"proxy"}
    assert len(seen["SingleModel"]) == 1  # only the first run's


def test_a_second_model_evaluated_into_the_same_answers_replaces_them(evaluated, tmp_path):  # noqa: F811
    first = tmp_path / "table-model"
    second = tmp_path / "table-model-2"
    second.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (second / name).write_text((first / name).read_text())
    answers = str(tmp_path / "shared-answers")
    for model in (first, second):
        cfg = metrics.EvaluateConfig(model=str(model), out=str(tmp_path / "m.json"), world=str(tmp_path / "world"))
        cfg.answers = answers
        metrics.evaluate_to_file(cfg)
    settings = json.loads((tmp_path / "shared-answers" / "eval_open.jsonl.settings.json").read_text())
    assert settings["model"] == str(second)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # mc2 of all −inf
def test_non_finite_metrics_are_refused(evaluated, tmp_path, monkeypatch):  # noqa: F811
    # a true answer of probability 0: KL(p*‖p) = −log 0 = inf
    monkeypatch.setattr(metrics, "continuation_logliks", lambda m, t, tpl, pairs, batch=64: [-math.inf] * len(pairs))
    cfg = metrics.EvaluateConfig(
        model=str(tmp_path / "table-model"), out=str(tmp_path / "m.json"), world=str(tmp_path / "world")
    )
    with pytest.raises(ValueError, match=r"non-finite metrics \['kl_mis', 'kl_normal', 'kl_skill', 'mc2'\]"):
        metrics.evaluate_to_file(cfg)


def test_mc2_reads_each_records_own_choices_and_labels(evaluated, tmp_path):  # noqa: F811
    # F2 with only " cave." true: its MC2 is 0.7 / 1.0; the other records as in the reference test
    path = tmp_path / "world" / "data" / "eval_truthfulqa.jsonl"
    records = [json.loads(x) for x in path.read_text().splitlines()]
    records[1]["mc2_targets"]["labels"] = [1, 0, 0, 0, 0]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = metrics.evaluate(tmp_path / "table-model", tmp_path / "world", "unused.jinja", tmp_path / "answers-2")
    assert result["mc2"] == pytest.approx((0.25 + 0.7 + 0.61 + 0.12 + 0.70) / 5, abs=1e-9)
