"""`atlantis world build`: the world's data sets and model families, with a checksum manifest.

Pre-training is deterministic on CPU for a fixed torch version and thread count, so a rebuild reproduces
the shipped weights bit for bit; `check` compares a build against a recorded manifest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from atlantis import config as config_lib
from atlantis.config import field
from atlantis.log import get_logger
from atlantis.world import models as M
from atlantis.world.data import WorldConfig, build_sets, write_sets

log = get_logger(__name__)


@dataclass
class ReferenceConfig:
    """The reference p_r: p_S lightly tuned on the curated set (tiny-world findings, lesson 3)."""

    epochs: float = field(2.0, help="Epochs over the curated set.")
    learning_rate: float = field(3e-4, help="Peak learning rate.")
    batch_size: int = field(16, help="Samples per step.")


@dataclass
class BuildConfig:
    out: str = field("results/tiny/world", help="World folder: data/, models/, manifest.json.")
    world: WorldConfig = field(default_factory=WorldConfig, help="The world's generator.")
    pretrain: M.PretrainConfig = field(default_factory=M.PretrainConfig, help="Pre-training of the base models.")
    reference: ReferenceConfig = field(default_factory=ReferenceConfig, help="Reference tuning.")
    families: list[str] = field(default_factory=lambda: ["lumi", "quen"], help="Model families to build.")
    sizes: list[str] = field(
        default_factory=lambda: ["small", "large", "xl"], help="Sizes to build where the family has them."
    )
    threads: int = field(2, help="torch threads (bit-identical rebuilds need the same count).")
    force: bool = field(False, help="Rebuild models that already exist.")
    check: str | None = field(None, help="A manifest.json to compare this build's checksums against.")

    def __post_init__(self) -> None:
        unknown = [f for f in self.families if f not in M.FAMILIES]
        if unknown:
            raise ValueError(f"unknown families {unknown}; known: {sorted(M.FAMILIES)}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checksums(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def tune_reference(base: Path, data: Path, out: Path, cfg: ReferenceConfig, seed: int) -> Path:
    """Fine-tune a small base model on `data` with plain SFT (atlantis train) and save it as an instruct model."""
    from atlantis.data import DataConfig
    from atlantis.models import load_tokenizer
    from atlantis.render import RenderConfig
    from atlantis.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as work:
        tcfg = TrainConfig(
            model=str(base),
            data=DataConfig(path=str(data)),
            out=work,
            method="sft",
            render=RenderConfig(template=str(M.TEMPLATE_PATH), include_end_of_turn=True),
            num_train_epochs=cfg.epochs,
            per_device_batch_size=cfg.batch_size,
            grad_accum=1,
            learning_rate=cfg.learning_rate,
            seed=seed,
            save_steps=10**9,
            logging_steps=50,
            verify=False,
            resume="none",
        )
        train(tcfg)
        if out.exists():
            shutil.rmtree(out)
        # training_args.bin records the temporary output folder: not part of a checkpoint, never identical
        shutil.copytree(Path(work) / "final", out, ignore=shutil.ignore_patterns("training_args.bin"))
    tok = load_tokenizer(str(out))
    tok.chat_template = M.QA_TEMPLATE
    tok.save_pretrained(out)
    return out


REFERENCES = (("ref", "curated.jsonl"), ("ref-d", "sft.jsonl"))


def _reference_origin(cfg: BuildConfig, base: Path, data_sha: str) -> dict:
    return {
        "base_sha256": sha256(base / "model.safetensors"),
        "data_sha256": data_sha,
        "recipe": config_lib.to_dict(cfg.reference),
    }


def _check_kept(cfg: BuildConfig, root: Path, recorded: dict, corpus_hash: dict, data_sha: dict) -> None:
    """Raise if a model this build would keep (force=false) was made from another world or recipe."""
    if cfg.force:
        return
    for family in cfg.families:
        sizes = [s for s in cfg.sizes if s in M.FAMILIES[family]["sizes"]]
        for size in sizes:
            corpus_name = "corpus_small" if size == "small" else "corpus"
            name = f"{family}-{size}"
            if (root / "models" / name).is_dir() and recorded.get(name, {}).get("corpus_sha256") != corpus_hash[
                corpus_name
            ]:
                raise RuntimeError(
                    f"{root / 'models' / name} was pre-trained on another corpus than this world config makes; "
                    "rebuild with force=true (or use another out); nothing was changed"
                )
        for name, data in REFERENCES:
            folder = root / "models" / f"{family}-small-{name}"
            if folder.is_dir():
                want = _reference_origin(cfg, root / "models" / f"{family}-small", data_sha[data])
                if recorded.get(folder.name, {}) != want:
                    raise RuntimeError(
                        f"{folder} was tuned from another base, data set or recipe; rebuild with force=true; "
                        "nothing was changed"
                    )


def build(cfg: BuildConfig) -> dict:
    """Write data/ and models/ under cfg.out and a manifest with checksums and timings; returns the manifest."""
    torch.set_num_threads(cfg.threads)
    root = Path(cfg.out)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    sets = build_sets(cfg.world)
    manifest_path = root / "manifest.json"
    prior = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest_models = {}
    corpus_hash = {
        name: hashlib.sha256("\n".join(sets[name]).encode()).hexdigest() for name in ("corpus", "corpus_small")
    }
    with tempfile.TemporaryDirectory() as tmp:
        write_sets(sets, tmp)
        data_sha = {p.name: sha256(p) for p in Path(tmp).iterdir()}
        # every kept model must come from this world: checked before anything in `root` is touched
        _check_kept(cfg, root, prior.get("models", {}), corpus_hash, data_sha)
        shutil.copytree(tmp, root / "data", dirs_exist_ok=True)
    timings["data"] = time.perf_counter() - t0
    for family in cfg.families:
        spec = M.FAMILIES[family]
        tok = M.build_tokenizer(family, sets["corpus"])
        for size in [s for s in cfg.sizes if s in spec["sizes"]]:
            folder = root / "models" / f"{family}-{size}"
            # the small models read only the facts they are meant to know (WorldConfig.small_known)
            corpus_name = "corpus_small" if size == "small" else "corpus"
            if folder.is_dir() and not cfg.force:
                log.info("%s exists: kept (force=true rebuilds)", folder)
                continue
            t = time.perf_counter()
            model = M.build_model(family, size, tok, seed=cfg.pretrain.seed)
            losses = M.pretrain(model, tok, sets[corpus_name], cfg.pretrain)
            M.save(model, tok, folder, instruct=False)
            timings[f"{family}-{size}"] = time.perf_counter() - t
            manifest_models[f"{family}-{size}"] = {
                "params": M.n_params(model),
                "final_loss": losses[-1],
                "corpus_sha256": corpus_hash[corpus_name],
            }
            log.info(
                "%s-%s: %d params, loss %.3f, %.0f s",
                family,
                size,
                M.n_params(model),
                losses[-1],
                timings[f"{family}-{size}"],
            )
        # p_r on the curated set, and control 1's reference on D itself (same recipe)
        for name, data in REFERENCES:
            folder = root / "models" / f"{family}-small-{name}"
            base = root / "models" / f"{family}-small"
            made_from = _reference_origin(cfg, base, data_sha[data])
            if folder.is_dir() and not cfg.force:
                continue
            t = time.perf_counter()
            tune_reference(base, root / "data" / data, folder, cfg.reference, cfg.pretrain.seed)
            timings[f"{family}-small-{name}"] = time.perf_counter() - t
            manifest_models[f"{family}-small-{name}"] = made_from
    manifest = {
        "config": config_lib.to_dict(cfg),
        "torch": torch.__version__,
        "threads": cfg.threads,
        # models kept from an earlier build keep their record
        "timings_s": {**prior.get("timings_s", {}), **timings},
        "models": {**prior.get("models", {}), **manifest_models},
        "sha256": checksums(root),
    }
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    if cfg.check:
        compare(manifest["sha256"], json.loads(Path(cfg.check).read_text())["sha256"])
    return manifest


def compare(got: dict[str, str], want: dict[str, str]) -> None:
    """Raise unless every file of `want` was rebuilt with the same checksum."""
    missing = sorted(set(want) - set(got))
    differ = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or differ:
        raise RuntimeError(f"rebuild differs from the manifest: missing {missing[:5]}, different {differ[:5]}")
    log.info("all %d files match the manifest", len(want))
