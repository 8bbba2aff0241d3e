"""The world judge's pairwise verdict and `atlantis world evaluate`'s file (from the mutation survivors of
bench/mutation.py), on the table model of tests/test_world_metrics_reference.py."""

import json

import pytest
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
