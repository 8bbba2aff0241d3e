"""The training data path against independent references: labels, weights by id, subset weights, resume.

Each test compares with values built here by hand, not with what `atlantis.train` or `atlantis.render` compute:
- the labels of a sample against its chat text written out by hand and tokenised piece by piece;
- the weight each batch row carries, through the Trainer's own shuffling data loader, against the weight
  derived from the id found in the row's decoded text;
- the weights of a Table 3 subset against a water-filled renormalisation worked out by hand;
- a resumed run against an uninterrupted one and against a restart with a fresh optimizer.
"""

import copy
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_jsonl
from test_train import cfg_for
from transformers import AutoModelForCausalLM, TrainerCallback

import atlantis.train as train_mod
from atlantis.data import DataConfig
from atlantis.loss import IGNORE_INDEX
from atlantis.models import load_tokenizer
from atlantis.render import NAMED_TEMPLATES
from atlantis.train import build_dataset, train

N = 8
WORDS = ["fox", "dog", "sea"]


def answer(i: int) -> str:
    return " ".join(WORDS[j % 3] for j in range(2 + 2 * i))


def conversation(i: int) -> list[dict]:
    """Sample s{i}: even ones have two exchanges, s1 a system turn; every prompt names its sample."""
    turns = [{"from": "system", "value": "Be brief."}] if i == 1 else []
    turns += [{"from": "human", "value": f"Count {i} animals."}, {"from": "gpt", "value": answer(i)}]
    if i % 2 == 0:
        turns += [{"from": "human", "value": "And two more?"}, {"from": "gpt", "value": "sea fox"}]
    return turns


def weight_of(sample_id: str) -> float:
    """A distinct weight per id, mean exactly 1 over s0..s7 (so renormalisation leaves them as they are)."""
    return (int(sample_id[1:]) + 1) / 4.5


@pytest.fixture(scope="module")
def world(tmp_path_factory, models):
    root = tmp_path_factory.mktemp("data_path")
    ids = [f"s{i}" for i in range(N)]
    data = write_jsonl(root / "d.jsonl", [{"id": f"s{i}", "conversations": conversation(i)} for i in range(N)])
    pq.write_table(pa.table({"id": ids, "weight": [weight_of(i) for i in ids]}), root / "w.parquet")
    # `model`: the default p_L of test_train's `cfg_for`
    return {
        "models": models,
        "model": models["llama"],
        "data": str(data),
        "weights": str(root / "w.parquet"),
        "root": root,
    }


# ------------------------------------------------------------------------------- 1. labels by hand


def plain_pieces(i: int) -> list[tuple[str, bool]]:
    """Sample s{i} under the `plain` template, written out by hand: (text, trained). The training render trains
    each response and the end-of-sequence token after it (include_end_of_turn), never the blank line."""
    system = "Be brief.\n\n" if i == 1 else ""
    pieces = [(f"{system}User: Count {i} animals.\n\nAssistant:\n", False), (answer(i) + "</s>", True)]
    if i % 2 == 0:
        pieces += [("\n\nUser: And two more?\n\nAssistant:\n", False), ("sea fox</s>", True)]
    return [*pieces, ("\n\n", False)]


def chatml_pieces(i: int) -> list[tuple[str, bool]]:
    """The same under the instruct qwen2's ChatML template: the response and its <|im_end|>, not the newline."""
    system = "<|im_start|>system\nBe brief.<|im_end|>\n" if i == 1 else ""
    user = f"{system}<|im_start|>user\nCount {i} animals.<|im_end|>\n<|im_start|>assistant\n"
    pieces = [(user, False), (answer(i) + "<|im_end|>", True)]
    if i % 2 == 0:
        more = "\n<|im_start|>user\nAnd two more?<|im_end|>\n<|im_start|>assistant\n"
        pieces += [(more, False), ("sea fox<|im_end|>", True)]
    return [*pieces, ("\n", False)]


@pytest.mark.parametrize(
    ("model", "pieces_of", "template"),
    [("llama", plain_pieces, NAMED_TEMPLATES["plain"]), ("qwen2-it", chatml_pieces, None)],
    ids=["plain-bos", "chatml"],
)
def test_labels_are_exactly_the_response_tokens_of_a_hand_rendering(world, tmp_path, model, pieces_of, template):
    path = world["models"][model]
    tok = load_tokenizer(path)
    ds = build_dataset(cfg_for(world, tmp_path, model=path), tok)  # the default render of TrainConfig
    by_id = {sid: k for k, sid in enumerate(ds.ids)}
    assert sorted(by_id) == [f"s{i}" for i in range(N)]
    for i in (0, 1, 3):  # two exchanges; a system turn; one exchange
        pieces = pieces_of(i)
        messages = [
            {"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]}
            for t in conversation(i)
        ]
        # the hand text is the template's text (the template itself is not what is being tested here)
        assert "".join(p for p, _ in pieces) == tok.apply_chat_template(
            messages, chat_template=template, tokenize=False
        )
        ids, labels = [], []
        if tok.bos_token_id is not None:  # llama's tokenizer puts <s> in front; it is never trained
            ids, labels = [tok.bos_token_id], [IGNORE_INDEX]
        for text, trained in pieces:
            toks = tok(text, add_special_tokens=False)["input_ids"]
            ids += toks
            labels += toks if trained else [IGNORE_INDEX] * len(toks)
        k = by_id[f"s{i}"]
        assert ds.input_ids[k] == ids
        assert ds.labels[k] == labels, f"s{i}: trained positions differ from the hand rendering"
        # and the trained text is exactly the responses with their end-of-turn tokens
        trained_text = tok.decode([t for t in ds.labels[k] if t != IGNORE_INDEX])
        assert trained_text == "".join(p for p, trained in pieces if trained)


# ------------------------------------------------------------------- 2. weights follow their samples


SAMPLE_IN_TEXT = re.compile(r"Count (\d+) animals\.")
TRAINER_CLASS = train_mod._trainer_class  # before any test patches it


def recording_trainer(seen: list[dict]):
    """The training run's own Trainer class, recording what compute_loss receives: per batch row, the optimizer
    step it belongs to, the sample it holds (read from its decoded text) and the weight it carries."""
    base = TRAINER_CLASS()

    class Recording(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            for row, weight in enumerate(inputs["weights"]):
                tokens = inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist()
                found = SAMPLE_IN_TEXT.findall(self.processing_class.decode(tokens))
                assert len(found) == 1, found
                seen.append({"step": self.state.global_step + 1, "id": f"s{found[0]}", "weight": float(weight)})
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return lambda: Recording


def test_every_batch_row_carries_the_weight_of_its_own_sample(world, tmp_path, monkeypatch):
    tok = load_tokenizer(world["models"]["llama"])
    ds = build_dataset(cfg_for(world, tmp_path / "x"), tok)
    for k, sid in enumerate(ds.ids):
        assert ds[k]["weights"] == pytest.approx(weight_of(sid), rel=1e-12), sid
        assert SAMPLE_IN_TEXT.findall(tok.decode(ds[k]["input_ids"])) == [sid[1:]]
    # through the run's shuffling data loader and the collator: one epoch in micro-batches of 2
    seen: list[dict] = []
    monkeypatch.setattr(train_mod, "_trainer_class", recording_trainer(seen))
    train(cfg_for(world, tmp_path / "run", max_steps=4, per_device_batch_size=2))
    order = [s["id"] for s in seen]
    assert sorted(order) == sorted(ds.ids)  # every sample once
    assert order != ds.ids  # shuffled: a join by position would show
    for s in seen:
        assert s["weight"] == pytest.approx(weight_of(s["id"]), rel=1e-12), s


# -------------------------------------------------------------------------- 3. subset renormalisation


def test_subset_weights_are_water_filled_to_mean_one_under_the_cap(world, tmp_path):
    """Table 3: a subset's weights are rescaled to mean 1 over the samples trained, keeping the cap.

    Weights of s0..s19, mean 1 over the 20, made with cap 10: s0 = 10 (at the cap), s1 = 2.8, and the other 18
    alternate 0.2 and 0.6 (sum 7.2). s20 is in the data but was left out by the weights step (no weight). The
    subset drops s1 and keeps s20: trained are s0 and the 18 light ones, 19 samples of mean 17.2 / 19 < 1.
    Dividing by that mean would lift s0 to 11.05, above the cap. Water-filling keeps s0 at 10 and lets the 18
    others share the remaining 19 - 10 = 9 in proportion to their weights: scale 9 / 7.2 = 1.25, so 0.2 -> 0.25
    and 0.6 -> 0.75. Check: (10 + 9 * 0.25 + 9 * 0.75) / 19 = 1.
    """
    ids = [f"s{i}" for i in range(21)]
    records = [
        {"id": i, "conversations": [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": "sea fox"}]}
        for i in ids
    ]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    light = {f"s{i}": 0.2 if i % 2 == 0 else 0.6 for i in range(2, 20)}
    given = {"s0": 10.0, "s1": 2.8, **light}
    assert sum(given.values()) == pytest.approx(20.0) and max(given.values()) == 10.0
    weights = tmp_path / "w.parquet"
    pq.write_table(pa.table({"id": list(given), "weight": list(given.values())}), weights)
    diagnostics = {"clip_at": 10.0, "floor": 0.0, "excluded": [{"id": "s20", "reason": "different y"}]}
    (tmp_path / "w.diagnostics.json").write_text(json.dumps(diagnostics))
    subset = [i for i in ids if i != "s1"][::-1]  # in another order than the data
    (tmp_path / "subset.txt").write_text("\n".join(subset) + "\n")
    expected = {"s0": 10.0} | {i: 0.25 if w == 0.2 else 0.75 for i, w in light.items()}
    assert sum(expected.values()) / len(expected) == pytest.approx(1.0)

    tok = load_tokenizer(world["models"]["llama"])
    cfg = cfg_for(world, tmp_path / "o", data=DataConfig(path=str(data)), weights=str(weights))
    cfg.subset = str(tmp_path / "subset.txt")
    ds = build_dataset(cfg, tok)
    assert sorted(ds.ids) == sorted(expected)  # s1 not in the subset, s20 without a weight
    got = dict(zip(ds.ids, ds.weights))
    for i, w in expected.items():
        assert got[i] == pytest.approx(w, rel=1e-9), (i, got[i], w)
    assert max(ds.weights) <= 10.0 + 1e-9
    # without renormalisation the same subset trains on the raw weights (mean 0.905): what the test tells apart
    cfg.renormalize_weights = False
    raw = build_dataset(cfg, tok)
    assert dict(zip(raw.ids, raw.weights)) == pytest.approx({i: given[i] for i in expected})


# ------------------------------------------------------------------------------------------ 4. resume


class StopBeforeStep(TrainerCallback):
    """The run dies (as if killed) before it trains optimizer step `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            raise KeyboardInterrupt(f"killed before step {self.step}")


class FirstStepState(TrainerCallback):
    """The optimizer state and the steps actually trained by this run (not those restored with its history)."""

    def __init__(self):
        self.trained, self.optimizer = [], None

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.optimizer is None:
            self.optimizer = copy.deepcopy(optimizer.state_dict())  # its tensors are updated in place

    def on_step_end(self, args, state, control, **kwargs):
        self.trained.append(state.global_step)


def losses(log_history: list[dict]) -> list[dict]:
    return [{k: h[k] for k in ("step", "loss", "grad_norm", "learning_rate")} for h in log_history if "loss" in h]


def test_resume_continues_from_the_checkpoint_not_from_scratch(world, tmp_path, monkeypatch):
    """Killed after checkpoint-2 of 4, in the middle of the epoch; the rerun must start at step 3 with the
    checkpoint's optimizer and scheduler and the data where they were, not replay steps 1-2 from the seed."""
    kw = dict(max_steps=4, per_device_batch_size=2, grad_accum=2, save_steps=2)
    seen_full: list[dict] = []
    monkeypatch.setattr(train_mod, "_trainer_class", recording_trainer(seen_full))
    full = train(cfg_for(world, tmp_path / "full", **kw))
    full_losses = losses(full.state.log_history)
    assert [h["step"] for h in full_losses] == [1, 2, 3, 4]

    out = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(world, out, **kw), callbacks=[StopBeforeStep(3)])
    assert (out / "checkpoint-2").is_dir() and not (out / "final").exists()

    seen: list[dict] = []
    monkeypatch.setattr(train_mod, "_trainer_class", recording_trainer(seen))
    state = FirstStepState()
    resumed = train(cfg_for(world, out, resume="auto", **kw), callbacks=[state])
    assert state.trained == [3, 4]  # a fresh run with the same seed would train 1, 2, 3, 4 to the same losses
    # the micro-batches of steps 3-4 are the uninterrupted run's: the data loader skipped what was trained
    assert seen == [s for s in seen_full if s["step"] in (3, 4)]
    # the optimizer resumed with the checkpoint's AdamW moments and step count, not empty
    saved = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=False)["state"]
    restored = state.optimizer["state"]
    assert saved and set(restored) == set(saved)
    for p in saved:
        assert float(restored[p]["step"]) == 2.0
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(restored[p][k], saved[p][k]), (p, k)
    # the history: steps 1-2 restored from the checkpoint, 3-4 trained again, all as uninterrupted
    record = json.loads((out / "train_record.json").read_text())
    assert losses(record["log_history"]) == losses(resumed.state.log_history)
    for a, b in zip(full_losses, losses(resumed.state.log_history), strict=True):
        assert a == pytest.approx(b, rel=1e-6)
    p_full = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "final").state_dict()
    p_resumed = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    for k in p_full:
        assert torch.allclose(p_full[k], p_resumed[k], atol=1e-6), k


def test_a_fresh_optimizer_on_the_checkpoint_weights_trains_differently(world, tmp_path):
    """What resuming restores beyond the weights shows in the losses.

    Full batches (every step sees all 8 samples, so the data order cannot matter) and lr 1e-3 decaying linearly
    to 0 over 4 steps. A restart from checkpoint-2's weights with lr 5e-4 over 2 steps has the same weights, data
    and learning rates at its steps 1-2 as the full run at steps 3-4; only AdamW's moments are new. Its first
    loss (before any update) equals the full run's step 3; its second differs. Resuming from the checkpoint
    (`resume=` a path) reproduces step 4.
    """
    kw = dict(per_device_batch_size=8, grad_accum=1)
    full = losses(train(cfg_for(world, tmp_path / "full", max_steps=4, save_steps=2, **kw)).state.log_history)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    fresh = train(cfg_for(world, tmp_path / "fresh", model=str(checkpoint), max_steps=2, learning_rate=5e-4, **kw))
    fresh = losses(fresh.state.log_history)
    resumed = train(cfg_for(world, tmp_path / "resumed", max_steps=4, save_steps=2, resume=str(checkpoint), **kw))
    resumed = losses(resumed.state.log_history)
    assert fresh[0]["loss"] == pytest.approx(full[2]["loss"], rel=1e-5)
    assert fresh[0]["grad_norm"] == pytest.approx(full[2]["grad_norm"], rel=1e-5)
    assert [h["learning_rate"] for h in fresh] == pytest.approx([h["learning_rate"] for h in full[2:]])
    progress = abs(full[3]["loss"] - full[2]["loss"])
    assert abs(fresh[1]["loss"] - full[3]["loss"]) > 0.1 * progress, (fresh, full)
    assert resumed[3]["loss"] == pytest.approx(full[3]["loss"], rel=1e-6)
    assert resumed[3]["grad_norm"] == pytest.approx(full[3]["grad_norm"], rel=1e-6)
