import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLES, write_jsonl

from atlantis.data import DataConfig, DataError, LoadReport, Turn, content_id, load_samples


def load(path, **kw):
    return load_samples(DataConfig(path=str(path), **kw))


def test_every_format_normalises(data_file):
    samples = load(data_file)
    assert [s.id for s in samples[:3]] == ["sg-1", "sg-multi", "msg-1"]
    assert samples[0].turns == (
        Turn("system", "You are a helpful assistant."),
        Turn("user", "What is two plus two?"),
        Turn("assistant", "Two plus two is four."),
    )
    assert samples[1].response_turns == [1, 3]
    assert samples[3].turns == (
        Turn("user", "Add two numbers in Python."),
        Turn("assistant", "def add(a, b):\n    return a + b"),
    )
    assert samples[4].turns[0] == Turn("user", "Translate\n\ncafé, naïve, 東京")
    assert samples[5].turns == (Turn("user", "Zorbs are"), Turn("assistant", " blue; florps are green; 12 + 30 = 42."))


def test_ids_are_given_or_content_hashes(data_file):
    samples = load(data_file)
    assert samples[3].id == content_id(samples[3].turns)
    assert samples[3].id.startswith("h") and len(samples[3].id) == 17
    # the hash depends on content only: same record elsewhere gets the same id
    again = load(write_jsonl(data_file.with_name("b.jsonl"), [SAMPLES[3]]))
    assert again[0].id == samples[3].id


def test_json_parquet_and_datasets_folder(tmp_path, data_file):
    ids = [s.id for s in load(data_file)]
    (tmp_path / "list.json").write_text(json.dumps(SAMPLES))
    (tmp_path / "dict.json").write_text(json.dumps({"data": SAMPLES}))
    assert [s.id for s in load(tmp_path / "list.json")] == ids
    assert [s.id for s in load(tmp_path / "dict.json")] == ids
    sharegpt = [r for r in SAMPLES if "conversations" in r]
    pq.write_table(pa.Table.from_pylist(sharegpt), tmp_path / "d.parquet")
    assert [s.id for s in load(tmp_path / "d.parquet")] == ["sg-1", "sg-multi"]
    import datasets

    datasets.Dataset.from_list(sharegpt).save_to_disk(str(tmp_path / "ds"))
    assert [s.turns for s in load(tmp_path / "ds")] == [s.turns for s in load(tmp_path / "d.parquet")]


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(SAMPLES[0]) + "\n" + '{"id": "x", "conversations": [\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        load(path)


def test_unknown_format_lists_accepted_ones(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"u\.jsonl:1: unknown record format.*sharegpt.*messages.*alpaca"):
        load(path)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]},
            r"x\.jsonl:1: empty response",
        ),
        ({"conversations": [{"from": "human", "value": "hi"}]}, r"x\.jsonl:1: conversation has no assistant turn"),
        ({"conversations": [{"from": "robot", "value": "hi"}]}, r"conversations\[0\]\.from' is 'robot'"),
        (
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
            r"field 'messages\[0\]\.content' must be a string",
        ),
        ({"instruction": "i"}, r"unknown record format"),
    ],
)
def test_bad_records(tmp_path, record, message):
    path = write_jsonl(tmp_path / "x.jsonl", [record])
    with pytest.raises(DataError, match=message):
        load(path)


def test_skip_invalid_keeps_a_report(tmp_path):
    bad = {"id": "empty", "prompt": "p", "completion": ""}
    path = write_jsonl(tmp_path / "x.jsonl", [SAMPLES[0], bad, SAMPLES[2]])
    report = LoadReport()
    samples = load_samples(DataConfig(path=str(path), on_invalid="skip"), report)
    assert [s.id for s in samples] == ["sg-1", "msg-1"]
    assert report.n_records == 3
    assert report.excluded[0]["source"].endswith("x.jsonl:2") and "empty response" in report.excluded[0]["reason"]


def test_duplicate_ids(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [SAMPLES[0], SAMPLES[2], SAMPLES[0]])
    with pytest.raises(DataError, match=r"d\.jsonl:3: duplicate id 'sg-1' \(first seen at .*d\.jsonl:1\)"):
        load(path)
    assert [s.id for s in load(path, on_duplicate="keep_first")] == ["sg-1", "msg-1"]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load(tmp_path / "nope.jsonl")
