"""Training under faults: bad settings, a run killed while saving, a full disk, a rerun of a finished run, and
inputs replaced in place between a run and its resumption.

Kill points are simulated on the folders a real tiny run leaves (emptied, truncated, a file missing, a save cut
off inside the Trainer), then the rerun is checked against the uninterrupted run.
"""

import errno
import gc
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import cfg_for
from test_train import world as world  # noqa: F401  (the fixture: tiny model, 8 samples, weights)
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback

import atlantis.train as train_mod
from atlantis.data import DataConfig
from atlantis.train import LoraConfig, TrainConfig, TrainError, train

# 8 samples at batch 4: 2 optimizer steps per epoch, so max_steps=3 ends in mid-epoch (where the Trainer, resumed
# from the last checkpoint, trained a step too many).
RUN = dict(max_steps=3, per_device_batch_size=4, save_steps=1, save_total_limit=None, resume="auto")


class Trained(TrainerCallback):
    """The optimizer steps this run trained (not those restored from a checkpoint)."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def rerun(world, out, **kw):
    steps = Trained()
    trainer = train(cfg_for(world, out, **{**RUN, **kw}), callbacks=[steps])
    return trainer, steps.steps


def weights_of(folder):
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def assert_same_model(a, b):
    pa_, pb = weights_of(a), weights_of(b)
    for k in pa_:
        assert torch.allclose(pa_[k], pb[k], atol=1e-6), k


def snapshot(folder):
    """Every path under `folder` with its mtime (ns) and size."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    """An uninterrupted run: checkpoints 1-3 (3 in mid-epoch), its final model and record."""
    out = tmp_path_factory.mktemp("faults") / "run"
    train(cfg_for(world, out, **RUN))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    return out


def unfinished_copy(finished, tmp_path):
    """The run as if killed after its last checkpoint, before its final model."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "final")
    (out / "train_record.json").unlink()
    return out


def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", refuse)
    monkeypatch.setattr(train_mod, "load_tokenizer", refuse)


# --------------------------------------------------------------------------------------------- settings


BAD_SETTINGS = [
    ("num_train_epochs", 0),
    ("num_train_epochs", -1.0),
    ("num_train_epochs", float("nan")),
    ("max_steps", 0),
    ("max_steps", -2),
    ("max_grad_norm", -1.0),
    ("max_grad_norm", float("inf")),
    ("warmup_steps", -1),
    ("seed", -1),
    ("seed", 2**32),
    ("learning_rate", 0.0),
    ("learning_rate", -1e-5),
    ("learning_rate", float("nan")),
    ("learning_rate", float("inf")),
    ("per_device_batch_size", 0),
    ("grad_accum", 0),
    ("weight_decay", -0.1),
    ("logging_steps", 0),
    ("save_steps", 0),
    ("save_total_limit", 0),
    ("loss_chunk", 0),
    ("lora.r", 0),
    ("lora.dropout", 1.0),
]


def plain_cfg(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(model="m", data=DataConfig(path="d.jsonl"), out=str(tmp_path / "o"), method="sft", **kw)


def with_setting(name: str, value) -> dict:
    if name.startswith("lora."):
        return {"lora": LoraConfig(enabled=True, **{name[5:]: value})}
    return {name: value}


@pytest.mark.parametrize(("name", "value"), BAD_SETTINGS, ids=[f"{n}={v}" for n, v in BAD_SETTINGS])
def test_every_bad_setting_is_refused_naming_field_value_and_range(name, value, tmp_path, monkeypatch):
    no_model_loads(monkeypatch)
    expected = rf"^{name} must be [^;]+; got {value!r}$"
    with pytest.raises(TrainError, match=expected):
        plain_cfg(tmp_path, **with_setting(name, value))
    # a config changed after construction is checked again, before anything loads or is written
    cfg = plain_cfg(tmp_path, lora=LoraConfig(enabled=name.startswith("lora.")))
    setattr(cfg.lora if name.startswith("lora.") else cfg, name.removeprefix("lora."), value)
    with pytest.raises(TrainError, match=expected):
        train(cfg)
    assert not (tmp_path / "o").exists()


def test_boundary_settings_are_accepted():
    cfg = TrainConfig(
        model="m", data=DataConfig(path="d"), out="o", method="sft", max_grad_norm=0.0, max_steps=-1, warmup_steps=0
    )
    assert (cfg.max_grad_norm, cfg.max_steps, cfg.seed) == (0.0, -1, 0)
    # a preset divides its step schedule by grad_accum: a bad one is named before that
    with pytest.raises(TrainError, match=r"^grad_accum must be an integer >= 1; got 0$"):
        TrainConfig(model="m", data=DataConfig(path="d"), out="o", method="sft", preset="paper-13b", grad_accum=0)


# ------------------------------------------------------------------------------ killed while saving


def empty(ckpt):
    shutil.rmtree(ckpt)
    ckpt.mkdir()


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


KILL_POINTS = {
    "empty": empty,
    "weights-without-state": lambda c: [p.unlink() for p in c.iterdir() if p.name != "model.safetensors"],
    "no-optimizer": lambda c: (c / "optimizer.pt").unlink(),
    "no-scheduler": lambda c: (c / "scheduler.pt").unlink(),
    "truncated-weights": lambda c: truncate(c / "model.safetensors"),
    "truncated-optimizer": lambda c: truncate(c / "optimizer.pt"),
    "truncated-state": lambda c: truncate(c / "trainer_state.json"),
}


@pytest.mark.parametrize("damage", KILL_POINTS)
def test_resume_auto_takes_the_last_complete_checkpoint_and_sets_the_rest_aside(
    world, finished, tmp_path, damage, caplog
):
    out = unfinished_copy(finished, tmp_path)
    KILL_POINTS[damage](out / "checkpoint-3")
    with caplog.at_level(logging.WARNING, logger="atlantis"):
        _, trained = rerun(world, out)
    assert trained == [3]  # from checkpoint-2, not from scratch, not a crash
    aside = [p.name for p in out.glob("incomplete-checkpoint-3-*")]
    assert len(aside) == 1 and "checkpoint-3 (" in caplog.text and aside[0] in caplog.text
    assert train_mod._checkpoint_problem(out / "checkpoint-3") is None  # saved again, complete
    assert_same_model(out / "final", finished / "final")


def test_a_save_killed_midway_leaves_no_checkpoint_that_looks_complete(world, finished, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = Trainer._save_rng_state

    def killed_at_2(self, output_dir):
        if self.state.global_step == 2:  # weights and optimizer written, RNG state and trainer state not
            raise KeyboardInterrupt("killed while saving checkpoint-2")
        real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", killed_at_2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(world, out, **RUN))
    monkeypatch.undo()
    assert (out / "tmp-checkpoint-2" / "checkpoint-2" / "optimizer.pt").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    _, trained = rerun(world, out)
    assert trained == [2, 3]
    assert len(list(out.glob("incomplete-checkpoint-2-*"))) == 1 and not list(out.glob("tmp-*"))
    assert_same_model(out / "final", finished / "final")


def test_a_named_incomplete_checkpoint_is_refused(world, finished, tmp_path):
    out = unfinished_copy(finished, tmp_path)
    (out / "checkpoint-2" / "optimizer.pt").unlink()
    with pytest.raises(TrainError, match=r"resume=.*checkpoint-2: not a complete checkpoint \(no optimizer.pt\)"):
        train(cfg_for(world, out, **{**RUN, "resume": str(out / "checkpoint-2")}))


def test_killed_after_the_last_checkpoint_the_rerun_only_writes_the_final_model(world, finished, tmp_path):
    out = unfinished_copy(finished, tmp_path)
    trainer, trained = rerun(world, out)
    assert trained == [] and trainer.state.global_step == 3  # the Trainer alone trained step 4 here
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert_same_model(out / "final", finished / "final")


# ----------------------------------------------------------------------------------------- disk full

DISK_ERRORS = {
    "errno": OSError(errno.ENOSPC, "No space left on device"),
    "torch-zip-writer": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
    "safetensors": Exception("Error while serializing: I/O error: No space left on device (os error 28)"),
    "quota-wrapped": RuntimeError("could not write"),  # its cause: EDQUOT
}


def raise_(err):
    if str(err) == "could not write":
        raise err from OSError(errno.EDQUOT, "Disk quota exceeded")
    raise err


@pytest.mark.parametrize("kind", DISK_ERRORS)
def test_a_full_disk_while_checkpointing_says_so_in_one_line(world, finished, tmp_path, monkeypatch, kind):
    out = tmp_path / "run"
    real = Trainer._save_optimizer_and_scheduler

    def full_at_2(self, output_dir):
        if self.state.global_step == 2:
            raise_(DISK_ERRORS[kind])
        real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", full_at_2)
    with pytest.raises(TrainError) as err:
        train(cfg_for(world, out, **RUN))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{out / 'checkpoint-2'}: the disk is full (")
    assert "Free space there; the partial save was set aside as " in message
    assert message.endswith("rerunning with the same settings resumes from checkpoint-1, the last complete checkpoint")
    (aside,) = out.glob("incomplete-checkpoint-2-*")
    assert str(aside) in message and not (out / "checkpoint-2").exists()
    monkeypatch.undo()
    _, trained = rerun(world, out)
    assert trained == [2, 3]
    assert_same_model(out / "final", finished / "final")


def test_a_full_disk_while_writing_the_final_model_says_so(world, finished, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = Trainer.save_model

    def full_for_final(self, output_dir=None, _internal_call=False):
        if str(output_dir).endswith("tmp-final"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, output_dir, _internal_call)

    monkeypatch.setattr(Trainer, "save_model", full_for_final)
    with pytest.raises(TrainError, match=r"final: the disk is full .* resumes from checkpoint-3, the last complete"):
        train(cfg_for(world, out, **RUN))
    assert not (out / "final").exists() and not (out / "tmp-final").exists()
    monkeypatch.undo()
    _, trained = rerun(world, out)
    assert trained == []
    assert_same_model(out / "final", finished / "final")


def test_other_save_errors_pass_through_unchanged(world, tmp_path, monkeypatch):
    def broken(self, output_dir):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", broken)
    with pytest.raises(OSError, match="Input/output error"):
        train(cfg_for(world, tmp_path / "run", **RUN))


@pytest.fixture()
def small_disk(tmp_path):
    """A real 2.5 MB filesystem: room for one checkpoint of the tiny model (1.5 MB), not two."""
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs root to mount a small tmpfs; the monkeypatched tests cover the logic")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2500k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed here ({mounted.stderr.decode().strip()}); the monkeypatched tests cover it")
    yield disk
    gc.collect()  # the final model's tensors map its file
    if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)  # detached now, freed once unmapped


def test_a_real_full_disk(world, finished, small_disk):
    out = small_disk / "run"
    with pytest.raises(TrainError, match=r"checkpoint-2: the disk is full .*resumes from checkpoint-1") as err:
        train(cfg_for(world, out, **RUN))
    assert "\n" not in str(err.value)
    (aside,) = out.glob("incomplete-checkpoint-2-*")
    shutil.rmtree(aside)  # what the message says to do, and more room
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    _, trained = rerun(world, out)
    assert trained == [2, 3]
    assert_same_model(out / "final", finished / "final")


# ------------------------------------------------------------------------------------- finished runs


def test_rerunning_a_finished_run_does_nothing(world, finished, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    shutil.copytree(finished, out, copy_function=shutil.copy2)
    before = snapshot(out)
    no_model_loads(monkeypatch)
    with caplog.at_level(logging.INFO, logger="atlantis"):
        assert train(cfg_for(world, out, **RUN)) is None
    assert "already finished" in caplog.text
    assert snapshot(out) == before  # no checkpoint-4, nothing rewritten
    # the same folder with other settings is refused, not overwritten
    with pytest.raises(TrainError, match=r"holds a final model trained with other settings \(\['learning_rate'\]\)"):
        train(cfg_for(world, out, **{**RUN, "learning_rate": 5e-4}))
    assert snapshot(out) == before


# ------------------------------------------------------------------------------- inputs replaced in place


@pytest.fixture()
def own_inputs(world, tmp_path):
    """A copy of the world's model, data and weights that a test may change in place."""
    inputs = tmp_path / "inputs"
    shutil.copytree(world["model"], inputs / "model")
    for key in ("data", "weights"):
        shutil.copy(world[key], inputs)
    return {
        **world,
        "model": str(inputs / "model"),
        "data": str(inputs / "d.jsonl"),
        "weights": str(inputs / "w.parquet"),
    }


def perturb_model(inputs):
    path = os.path.join(inputs["model"], "model.safetensors")
    tensors = load_file(path)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, path, metadata={"format": "pt"})
    return "model file model.safetensors changed content"


def edit_data(inputs):
    path = Path(inputs["data"])
    path.write_text(path.read_text().replace("fox", "cat", 1))
    return "data file d.jsonl changed content"


def edit_weights(inputs):
    ids = [f"s{i}" for i in range(8)]
    pq.write_table(pa.table({"id": ids, "weight": [1.0] * 8}), inputs["weights"])
    return "weights file w.parquet changed content"


def edit_tokenizer(inputs):
    path = Path(inputs["model"]) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["model_max_length"] = 77
    path.write_text(json.dumps(config))
    return "model file tokenizer_config.json changed content"


REPLACEMENTS = {"model": perturb_model, "data": edit_data, "weights": edit_weights, "tokenizer": edit_tokenizer}


@pytest.mark.parametrize("what", REPLACEMENTS)
def test_resuming_with_an_input_replaced_in_place_is_refused(own_inputs, tmp_path, what):
    out = tmp_path / "run"
    kw = {**RUN, "max_steps": 1}
    train(cfg_for(own_inputs, out, **kw))
    shutil.rmtree(out / "final")  # killed before its final model: resume from checkpoint-1
    change = REPLACEMENTS[what](own_inputs)
    with pytest.raises(TrainError, match=rf"holds checkpoints of a run with other settings \(\['{change}'\]\)"):
        train(cfg_for(own_inputs, out, **kw))


def test_unchanged_inputs_are_not_hashed_again_and_a_touched_file_is_no_change(own_inputs, tmp_path, monkeypatch):
    out = tmp_path / "run"
    kw = {**RUN, "max_steps": 1}
    train(cfg_for(own_inputs, out, **kw))
    (out / "train_record.json").unlink()  # not finished: the rerun compares the checkpoints' settings
    hashed = []
    real = train_mod.file_sha256
    monkeypatch.setattr(train_mod, "file_sha256", lambda path: hashed.append(os.path.basename(path)) or real(path))
    rerun(own_inputs, out, **kw)
    assert hashed == []  # size and mtime unchanged: the recorded hashes hold
    (out / "train_record.json").unlink()
    os.utime(own_inputs["data"])  # a new mtime, the same bytes
    rerun(own_inputs, out, **kw)
    assert hashed == ["d.jsonl"]
    recorded = json.loads((out / "run_settings.json").read_text())["inputs"]
    assert set(recorded) == {"model", "data", "weights"}
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(recorded["model"]["files"])


# ------------------------------------------------------------------------------ one writer per run folder


def test_a_run_folder_locked_by_a_live_process_is_refused_before_the_model_loads(world, tmp_path, monkeypatch):
    import socket

    out = tmp_path / "run"
    lock = tmp_path / "run.lock"
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2024-01-01T00:00:00", "job": "other"}
    lock.write_text(json.dumps(holder))
    monkeypatch.setattr(train_mod, "build_dataset", lambda *a: pytest.fail("read the data under another's lock"))
    with pytest.raises(TrainError, match=rf"another process \(pid {os.getpid()} .*\) is writing {out}; wait or"):
        train(cfg_for(world, out, **RUN))
    assert json.loads(lock.read_text()) == holder and not out.exists()  # neither taken nor removed
    holder["pid"] = _dead_pid()  # its holder is gone: taken over, and released at the end
    lock.write_text(json.dumps(holder))
    monkeypatch.undo()
    train(cfg_for(world, out, **RUN))
    assert (out / "final").is_dir() and not lock.exists()


def _dead_pid() -> int:
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sigterm_releases_the_lock(tmp_path):
    """SLURM stops a job (time limit, scancel) with SIGTERM: the CLI exits through its `finally` blocks, so the
    output's lock is gone and a retry on another node is not refused."""
    import signal
    import sys
    import time

    from atlantis.testing import SAMPLES, build_tiny_model

    model = build_tiny_model(tmp_path / "m", "llama", seed=1)
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps(dict(r, id=f"s{i}-{k}")) + "\n" for k in range(400) for i, r in enumerate(SAMPLES))
    )
    out = tmp_path / "s.parquet"
    proc = subprocess.Popen(
        [sys.executable, "-m", "atlantis.cli", "score", f"model={model}", "role=small", f"data={data}", f"out={out}",
         "shard_size=8"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lock = tmp_path / "s.parquet.lock"
    deadline = time.monotonic() + 120
    while not lock.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock.exists(), proc.stderr.read() if proc.poll() is not None else "no lock after 120 s"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert not lock.exists() and not out.exists()
