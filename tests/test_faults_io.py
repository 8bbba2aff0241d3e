"""Faults around files: a model replaced in place under a resumed `atlantis score`, two invocations writing one
output, a data file with nothing left to score, inputs that are not plain UTF-8, and weights or IFD scores that
cannot be used. Each stops with one line naming the file (and line, column or ids) and what to do, or, where the
input is fine (a BOM), just works.

Score-file helpers come from test_bad_inputs, the scoring runner and its longer samples from test_scoring."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLES, write_jsonl
from test_bad_inputs import IDS, q, select_scores, weight_scores  # noqa: F401 (the shared fixtures)
from test_scoring import MORE, run

import atlantis.scoring as scoring
from atlantis.data import DataConfig, DataError, load_samples, read_jsonl
from atlantis.render import RenderConfig
from atlantis.scoring import ScoreConfig, ScoringError, score
from atlantis.selection import SelectConfig, SelectionError, read_subset
from atlantis.selection import write as write_selection
from atlantis.testing import build_tiny_model
from atlantis.weights import WeightsConfig, WeightsError, weights_for
from atlantis.weights import write as write_weights

# ------------------------------------------------------------------------ 1. a model replaced in place


def kill_at_shard(monkeypatch, n: int) -> None:
    """Make `atlantis score` die (KeyboardInterrupt) when it starts writing its n-th shard."""
    real, calls = scoring._atomic_write_table, []

    def dying(table, path):
        calls.append(path)
        if len(calls) == n:
            raise KeyboardInterrupt
        real(table, path)

    monkeypatch.setattr(scoring, "_atomic_write_table", dying)


def test_a_model_replaced_in_place_between_a_kill_and_a_rerun_is_refused(tmp_path, monkeypatch):
    model = build_tiny_model(tmp_path / "model", "llama", seed=1)
    data = write_jsonl(tmp_path / "data.jsonl", SAMPLES + MORE)
    whole = tmp_path / "whole.parquet"
    run(str(model), data, whole, shard_size=3)

    out = tmp_path / "s.parquet"
    real_write = scoring._atomic_write_table
    kill_at_shard(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run(str(model), data, out, shard_size=3)
    monkeypatch.setattr(scoring, "_atomic_write_table", real_write)
    shards = sorted((tmp_path / "s.parquet.parts").glob("shard-*"))
    assert len(shards) == 2 and not out.exists()

    original = tmp_path / "original.safetensors"
    shutil.copy2(model / "model.safetensors", original)
    build_tiny_model(model, "llama", seed=2)  # same architecture, same file names, other weights
    with pytest.raises(ScoringError) as err:
        run(str(model), data, out, shard_size=3)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 's.parquet.parts'} holds shards made from other data or settings")
    assert "the model's files model.safetensors (sha256 " in message and "a model replaced in place?" in message
    assert "rendered data" not in message and "score settings" not in message  # only what changed is named
    assert sorted((tmp_path / "s.parquet.parts").glob("shard-*")) == shards  # kept
    assert not out.exists()

    shutil.copy(original, model / "model.safetensors")  # the same content again (a new mtime: hashed again)
    scored = []
    real_shard = scoring._Scorer.score_shard
    monkeypatch.setattr(
        scoring._Scorer, "score_shard", lambda self, shard, bar: scored.append(1) or real_shard(self, shard, bar)
    )
    run(str(model), data, out, shard_size=3)
    assert len(scored) == 7 - 2  # resumed: only the missing shards
    assert out.read_bytes() == whole.read_bytes()
    report = json.loads(scoring.report_path(out).read_text())
    assert set(report["model_content"]["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}


def test_the_model_is_identified_by_content_not_by_path(models, tmp_path, monkeypatch):
    """A model folder moved (or copied) elsewhere between a kill and a rerun resumes the shards."""
    data = write_jsonl(tmp_path / "data.jsonl", SAMPLES + MORE)
    out = tmp_path / "s.parquet"
    real_write = scoring._atomic_write_table
    kill_at_shard(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(models["qwen2"], data, out, shard_size=4)
    monkeypatch.setattr(scoring, "_atomic_write_table", real_write)
    moved = shutil.copytree(models["qwen2"], tmp_path / "elsewhere")
    run(str(moved), data, out, shard_size=4)
    assert out.is_file()


def test_a_hub_id_without_a_cached_snapshot_is_identified_by_its_id(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from atlantis.provenance import model_content

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    got = model_content("nobody/no-such-model")
    assert got["hub"] == "nobody/no-such-model" and "identified by its id only" in got["note"]
    snapshot = tmp_path / "models--nobody--cached" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--nobody--cached" / "refs").mkdir()
    (tmp_path / "models--nobody--cached" / "refs" / "main").write_text("a" * 40)
    assert model_content("nobody/cached") == {"hub": "nobody/cached", "revision": "a" * 40}


# ------------------------------------------------------------------------------ 2. one writer per output


def write_lock(out, pid: int, host: str | None = None, age_s: float = 0.0):
    lock = out.with_name(out.name + ".lock")
    host = host or socket.gethostname()
    lock.write_text(json.dumps({"pid": pid, "host": host, "started": "2024-01-01T00:00:00", "job": "another job"}))
    os.utime(lock, (time.time() - age_s, time.time() - age_s))  # its holder's last heartbeat
    return lock


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_invocation_on_a_locked_output_is_refused(models, data_file, tmp_path):
    out = tmp_path / "s.parquet"
    write_lock(out, os.getpid())
    message = (
        rf"^another process \(pid {os.getpid()} on host {re.escape(socket.gethostname())}, started "
        rf"2024-01-01T00:00:00\) is writing {q(out)}; wait or remove the lock {q(out)}\.lock if that process is gone$"
    )
    with pytest.raises(ScoringError, match=message):
        run(models["llama"], data_file, out)
    assert not (tmp_path / "s.parquet.parts").exists() and not out.exists()
    assert json.loads((tmp_path / "s.parquet.lock").read_text())["pid"] == os.getpid()  # not taken, not removed


def test_two_real_processes_on_one_output_write_it_once(models, tmp_path):
    """Two `atlantis score` processes started together on one output: exactly one writes it, the other stops with
    the lock's message (or, if the first has already finished, with the refusal to overwrite); the file equals a
    lone run's and no lock or shard folder is left."""
    data = write_jsonl(
        tmp_path / "data.jsonl", [dict(r, id=f"s{i}-{k}") for k in range(40) for i, r in enumerate(SAMPLES)]
    )
    alone = tmp_path / "alone.parquet"
    run(models["llama"], data, alone)
    out = tmp_path / "s.parquet"
    cmd = [sys.executable, "-m", "atlantis.cli", "score", f"model={models['llama']}", "role=small", f"data={data}"]
    procs = [subprocess.Popen([*cmd, f"out={out}"], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    (loser,) = [err for rc, err in results if rc == 1]
    assert re.search(
        rf"another process \(pid \d+ .*\) is writing {re.escape(str(out))}|{re.escape(str(out))} exists", loser
    )
    assert pq.read_table(out).equals(pq.read_table(alone))
    assert not out.with_name(out.name + ".lock").exists() and not out.with_name(out.name + ".parts").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(models, data_file, tmp_path, caplog):
    out = tmp_path / "s.parquet"
    pid = dead_pid()
    write_lock(out, pid)
    with caplog.at_level(logging.WARNING, logger="atlantis"):
        run(models["llama"], data_file, out)
    assert f"taking over the lock of pid {pid} on {socket.gethostname()}" in caplog.text
    assert out.is_file() and not (tmp_path / "s.parquet.lock").exists()


def test_a_lock_from_another_host_is_kept_while_its_holder_beats_and_taken_over_when_it_stops(
    models, data_file, tmp_path
):
    out = tmp_path / "s.parquet"
    lock = write_lock(out, 1, host="node-elsewhere", age_s=60)
    with pytest.raises(ScoringError, match=r"^another process \(pid 1 on host node-elsewhere, started "):
        run(models["llama"], data_file, out)
    assert lock.is_file()
    write_lock(out, 1, host="node-elsewhere", age_s=scoring.OutputLock.STALE_AFTER_S + 60)  # killed on its node
    run(models["llama"], data_file, out)
    assert out.is_file() and not lock.exists()


def test_a_holder_touches_its_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(scoring.OutputLock, "HEARTBEAT_S", 0.05)
    lock = scoring.OutputLock(tmp_path / "s.parquet")
    lock.acquire()
    os.utime(lock.path, (0, 0))
    time.sleep(0.5)
    assert time.time() - lock.path.stat().st_mtime < 5
    lock.release()
    assert not lock.path.exists()


def test_the_ranks_of_one_job_share_the_lock_and_others_stay_out(models, data_file, tmp_path, monkeypatch):
    out = tmp_path / "two.parquet"
    lock = tmp_path / "two.parquet.lock"
    cfg = dict(model=models["llama"], role="small", out=str(out), data=DataConfig(path=str(data_file)), shard_size=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert score(ScoreConfig(**cfg)) is None  # rank 1 leaves the merge, and the lock, to rank 0
    assert lock.is_file()
    monkeypatch.setenv("WORLD_SIZE", "1")  # another invocation, single-process, on the same output
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ScoringError, match=rf"^another process \(pid {os.getpid()} on host .* is writing {q(out)};"):
        score(ScoreConfig(**cfg))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert score(ScoreConfig(**cfg)) == out  # rank 0 of the job: joins, merges, removes the lock
    assert not lock.exists()


def test_a_failed_run_releases_its_lock(models, data_file, tmp_path, monkeypatch):
    kill_at_shard(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run(models["llama"], data_file, tmp_path / "s.parquet", shard_size=2)
    assert not (tmp_path / "s.parquet.lock").exists()


# ------------------------------------------------------------------------------- 3. nothing left to score


def test_a_file_whose_only_record_is_fully_truncated_leaves_nothing_behind(models, tmp_path):
    long_prompt = {
        "id": "too-long",
        "conversations": [{"from": "human", "value": "word " * 200}, {"from": "gpt", "value": "ok"}],
    }
    data = write_jsonl(tmp_path / "one.jsonl", [long_prompt])
    message = (
        rf"^{q(data)}: no sample has a response token to score: all 1 are excluded, ids \['too-long'\] "
        r"\(response fully truncated \(\d+ tokens, max_length 32\)\); raise render.max_length \(now 32\)"
    )
    with pytest.raises(ScoringError, match=message):
        run(models["llama"], data, tmp_path / "s.parquet", render=RenderConfig(max_length=32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl"]  # no .parts, no lock, no output


# ------------------------------------------------------------------------- 4. BOM and non-UTF-8 inputs

BOM = b"\xef\xbb\xbf"


def lines_of(records) -> list[bytes]:
    return [json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_utf8_file_with_a_byte_order_mark_is_read(tmp_path, suffix):
    plain, bom = tmp_path / f"plain{suffix}", tmp_path / f"bom{suffix}"
    body = b"".join(lines_of(SAMPLES)) if suffix == ".jsonl" else json.dumps(SAMPLES).encode()
    plain.write_bytes(body)
    bom.write_bytes(BOM + body)
    got = load_samples(DataConfig(path=str(bom)))
    assert [(s.id, s.turns) for s in got] == [(s.id, s.turns) for s in load_samples(DataConfig(path=str(plain)))]
    subset = tmp_path / "subset.txt"
    subset.write_bytes(BOM + b"sg-1\nmsg-1\n")
    assert read_subset(subset) == ["sg-1", "msg-1"]
    assert read_jsonl(write_bom_jsonl(tmp_path / "answers.jsonl")) == [{"question_id": 1}, {"question_id": 2}]


def write_bom_jsonl(path):
    path.write_bytes(BOM + b'{"question_id": 1}\n{"question_id": 2}\n')
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_non_utf8_line_is_named_by_file_and_line(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    records = lines_of(SAMPLES[:2]) + ['{"prompt": "caf\u00e9", "completion": "ok"}\n'.encode("latin-1")]
    path.write_bytes(b"".join(records) if suffix == ".jsonl" else b"[\n" + b",".join(records) + b"]\n")
    line = 3 if suffix == ".jsonl" else 4
    position = records[2].index(b"\xe9") + 1 + (0 if suffix == ".jsonl" else 1)  # the JSON list's "," before it
    message = rf"^{q(path)}: line {line} is not UTF-8 \(byte 0xe9 at position {position}\); re-save the file as UTF-8$"
    with pytest.raises(DataError, match=message):
        load_samples(DataConfig(path=str(path)))


def test_a_bad_json_line_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(BOM + b"".join(lines_of(SAMPLES[:1])) + b'{"prompt": "x",\n')
    with pytest.raises(DataError, match=rf"^{q(path)}:2: malformed JSON \(Expecting property name"):
        load_samples(DataConfig(path=str(path)))


def test_answers_with_a_non_utf8_line_are_named_and_a_cut_last_character_is_an_interrupted_write(tmp_path):
    from atlantis.generate import read_done

    def answer(qid, text):
        return json.dumps({"question_id": qid, "model_id": "m", "turns": [text]}).encode() + b"\n"

    out = tmp_path / "answers.jsonl"
    out.write_bytes(answer(1, "a") + answer(2, "b").replace(b'"b"', b'"\xff"') + answer(3, "c"))
    with pytest.raises(DataError, match=rf"^{q(out)}: line 2 is not UTF-8 \(byte 0xff at position \d+\); re-save"):
        read_done(out, "m")
    cut = answer(2, "\u6771")[:-4]  # killed in the middle of a multi-byte character, before the newline
    out.write_bytes(answer(1, "a") + cut)
    assert read_done(out, "m") == {"1"} and out.read_bytes() == answer(1, "a")


# ----------------------------------------------------------------------------- 5. weights that cannot be used


def weights_file(path, ids, w):
    pq.write_table(pa.table({"id": ids, "log_weight_raw": np.zeros(len(ids)), "weight": np.asarray(w, float)}), path)
    return path


def test_all_zero_weights_are_refused_naming_the_file(tmp_path):
    path = weights_file(tmp_path / "w.parquet", IDS, [0.0] * 4)
    message = rf"^{q(path)}: column weight is 0 for all 4 sample\(s\), so the weights cannot be normalised"
    with pytest.raises(WeightsError, match=message):
        weights_for(IDS, path)
    subset = weights_file(tmp_path / "w2.parquet", IDS, [0.0, 0.0, 2.0, 2.0])  # zero on the samples trained on
    message = rf"^{q(subset)}: column weight is 0 for every one of the 2 training sample\(s\) \(e.g. ids \['a', 'b'\]\)"
    with pytest.raises(WeightsError, match=message):
        weights_for(["a", "b"], subset)
    np.testing.assert_array_equal(weights_for(["a", "c"], subset), [0.0, 2.0])  # some zeros are fine


def test_comparing_with_weights_of_other_ids_is_refused(weight_scores, tmp_path):  # noqa: F811
    other = weights_file(tmp_path / "other.parquet", ["x", "y"], [1.0, 1.0])
    message = rf"^compare: the weights file {q(other)} and the score files .* share no id \(e.g. \['x', 'y'\] vs"
    with pytest.raises(WeightsError, match=message):
        write_weights(WeightsConfig(scores=weight_scores, out=str(tmp_path / "w.parquet"), compare=str(other)))
    assert not (tmp_path / "w.parquet").exists()


# --------------------------------------------------------------------------------- 6. IFD that is undefined


def test_a_direct_loss_of_zero_is_refused_naming_the_file_column_and_ids(select_scores, tmp_path):  # noqa: F811
    direct = select_scores[1]
    table = pq.read_table(direct).to_pandas()
    table.loc[table["id"] == "c", "logp_mean_direct"] = 0.0  # probability 1: loss 0, the loss ratio divides by it
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), direct)
    message = (
        rf"^score file {q(direct)}: column logp_mean_direct is >= 0 \(a loss <= 0\) for 1 sample\(s\), e.g. ids "
        r"\['c'\]; IFD as a loss ratio is undefined for them \(ratio=ppl is not\)$"
    )
    with pytest.raises(SelectionError, match=message):
        write_selection(SelectConfig(scores=select_scores, out=str(tmp_path / "sel.parquet"), rate=0.5))
    assert not (tmp_path / "sel.parquet").exists()
    write_selection(SelectConfig(scores=select_scores, out=str(tmp_path / "sel.parquet"), rate=0.5, ratio="ppl"))
