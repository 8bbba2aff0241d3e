"""Outputs follow their inputs: every rule declares the models, data and settings files it reads, so a change of
one world file reschedules exactly the jobs that read it (and what depends on them), and nothing else.

The tiny profile's whole DAG is laid out in a scratch folder with every output present and newer than the shipped
world (what a finished default run leaves); then one world file is touched and `snakemake --summary` says which
outputs are due. The expected sets are derived here from the config, independently of the rules.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
RESULTS = "results/tiny"


def _snakemake(work: Path, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(work), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _summary(work: Path) -> dict[str, tuple[str, str]]:
    """output file -> (rule, plan), from `snakemake --summary`."""
    lines = _snakemake(work, "--summary").stdout.splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"))) for line in lines[1:] if line.strip()]
    return {r["output_file"]: (r["rule"], r["plan"]) for r in rows}


def _due(work: Path) -> set[str]:
    return {path for path, (_, plan) in _summary(work).items() if plan != "no update"}


def _set_mtime(path: Path, t: float) -> None:
    os.utime(path, (t, t))


def _due_after_touching(work: Path, path: Path) -> set[str]:
    """The outputs due once `path` is newer than every output; its mtime is put back afterwards."""
    before = path.stat().st_mtime
    try:
        _set_mtime(path, time.time() + 2000)
        return _due(work)
    finally:
        _set_mtime(path, before)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A scratch copy of the tiny profile's inputs with every output of the DAG present and up to date."""
    work = tmp_path_factory.mktemp("stale")
    shutil.copytree(ROOT / "config", work / "config")
    shutil.copytree(ROOT / RESULTS / "world", work / RESULTS / "world")
    (work / "atlantis" / "world").mkdir(parents=True)
    shutil.copy(ROOT / "atlantis" / "world" / "qa.jinja", work / "atlantis" / "world" / "qa.jinja")
    outputs = _summary(work)
    later = time.time() + 1000
    for path, (rule, _) in outputs.items():
        p = work / path
        if rule == "train":  # directory("…/final")
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.touch()
        _set_mtime(p, later)
    (work / "outputs.txt").write_text("\n".join(f"{path}\t{rule}" for path, (rule, _) in outputs.items()))
    return work


def _outputs(work: Path) -> dict[str, str]:
    """output file -> rule, as the fixture found them."""
    return dict(line.split("\t") for line in (work / "outputs.txt").read_text().splitlines())


def test_a_finished_run_has_nothing_due(finished):
    """No job reruns without cause; in particular none of the jobs that used to have no inputs at all."""
    assert _due(finished) == set()


def _runs(paths: set[str]) -> set[str]:
    return {p.split("/")[3] for p in paths if p.startswith(f"{RESULTS}/runs/")}


def test_a_changed_model_reruns_exactly_its_dependents(finished):
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    all_outputs = set(_outputs(finished))
    due = _due_after_touching(finished, finished / RESULTS / "world" / "models" / "quen-small" / "model.safetensors")
    # quen-small is the quen family's p_S (weights), the Superfiltering scorer of quen-large (`scorers:
    # {superfiltering: small}`) and the proxy's small model (Table 7)
    sel = cfg["experiments"]["selection"]
    assert sel["scorers"]["superfiltering"] == "small"
    seeds = [f".seed{s}" for s in cfg["experiments"]["main"]["seeds"] if s != 0]
    expected_runs = {"quen-large.atlantis", *(f"quen-large.atlantis{s}" for s in seeds)}
    expected_runs |= {
        f"{large}.atlantis.cross-quen" for large, fam in cfg["experiments"]["cross"].items() if fam == "quen"
    }
    for rate in sel["rates"]:
        expected_runs |= {f"quen-large.atlantis.ifd-{rate}", f"quen-large.atlantis.superfiltering-{rate}"}
        expected_runs.add(f"quen-large.sft.superfiltering-{rate}")  # its subset is scored by quen-small
    assert _runs(due) == expected_runs
    assert {p for p in due if "/scores/" in p} == {
        f"{RESULTS}/scores/quen.small/{kind}.parquet"
        for kind in ("weights", "superfiltering_cond", "superfiltering_direct")
    }
    assert f"{RESULTS}/weights/quen.parquet" in due and f"{RESULTS}/weights/lumi.parquet" not in due
    assert (
        f"{RESULTS}/metrics/quen-large.proxy.json" in due and f"{RESULTS}/metrics/quen-large.proxy/lmeval.json" in due
    )
    # untouched: the other family, IFD (scored by the large model), the fixed models' evaluations
    untouched = [
        f"{RESULTS}/runs/quen-large.sft/final",
        f"{RESULTS}/runs/lumi-large.atlantis/final",
        f"{RESULTS}/selection/quen-large/ifd-0.05.parquet",
        f"{RESULTS}/metrics/quen-small-ref.json",
        f"{RESULTS}/metrics/lumi-large.sft.json",
    ]
    assert all(p in all_outputs for p in untouched) and not due & set(untouched)


def test_changed_world_data_regrades_every_model_and_trains_nothing(finished):
    """The held-out questions are read by the graders only: every evaluation is due, no score or training job."""
    due = _due_after_touching(finished, finished / RESULTS / "world" / "data" / "eval_truthfulqa.jsonl")
    assert not _runs(due) and not {p for p in due if "/scores/" in p or "/weights/" in p}
    evaluated = {p for p, rule in _outputs(finished).items() if rule.startswith("world_evaluate")}
    assert evaluated and evaluated <= due  # the 3 fixed models and the proxy included
    assert f"{RESULTS}/metrics/lumi-large.sft/lmeval.json" in due
