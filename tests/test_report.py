"""Tables, figures, provenance and the SLURM launch environment: real values on small hand-made inputs."""

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from atlantis import provenance
from atlantis.figures import FiguresConfig
from atlantis.figures import render as render_figures
from atlantis.launch import srun_prefix, torch_env_from_slurm
from atlantis.report import TABLES, ReportConfig, ReportError, Spec, render

ROOT = Path(__file__).parents[1]
PAPER = ROOT / "results" / "paper"


def _matrix(tmp_path: Path, seeds=(0, 1, 2)) -> Path:
    """A profile with one main model (two families for cross), Table 3 at one rate, and a proxy."""
    config = {
        "profile": "toy",
        "large": {"q-large": {"family": "q"}, "g-large": {"family": "g"}},
        "experiments": {
            "main": {"large": ["q-large", "g-large"], "seeds": list(seeds)},
            "selection": {"large": ["q-large"], "selectors": ["ifd"], "rates": [0.05]},
            "cross": {"q-large": "g"},
            "proxy": {"large": ["q-large"]},
        },
    }
    runs = {}
    for large, fam in (("q-large", "q"), ("g-large", "g")):
        for m in ("sft", "atlantis"):
            for s in seeds:
                runs[f"{large}.{m}" + (f".seed{s}" if s else "")] = {"large": large, "method": m, "family": fam} | (
                    {"seed": s} if s else {}
                )
    for m in ("sft", "atlantis"):
        runs[f"q-large.{m}.ifd-0.05"] = {"large": "q-large", "method": m, "family": "q", "subset": "x"} | {
            "selector": "ifd",
            "rate": 0.05,
        }
    runs["q-large.atlantis.cross-g"] = {"large": "q-large", "method": "atlantis", "family": "g", "cross": True}
    report = {
        "stands_for": {"q-large": "Qwen2-7B", "g-large": "Gemma2-9B"},
        "family_names": {"q": "Qwen2", "g": "Gemma2"},
        "metrics": {"truthfulqa_mc1": {"metric": "mc1", "scale": 100}, "mtbench_single": {"metric": "judge"}},
        "fig3_metrics": ["mc1", "judge", "other"],
        "fig4_pair": ["q", "g"],
    }
    path = tmp_path / "matrix.json"
    path.write_text(json.dumps({"config": config, "runs": runs, "report": report}))
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    # SFT mc1 = 0.50 + 0.01 s; ATLANTIS = SFT + 0.02 + 0.01 s (paired differences 0.02, 0.03, 0.04)
    for run, r in runs.items():
        s = r.get("seed", 0)
        mc1 = 0.50 + 0.01 * s + (0.02 + 0.01 * s if r["method"] == "atlantis" else 0.0)
        rec = {"metrics": {"mc1": mc1, "judge": 5.0 + s, "other": 1.0}, "provenance": {"seed": s}}
        (metrics / f"{run}.json").write_text(json.dumps(rec))
    (metrics / "q-large.proxy.json").write_text(json.dumps({"metrics": {"mc1": 0.4, "judge": 3.0, "other": 1.0}}))
    return path


def test_tables_join_paper_rows_and_compute_paired_deltas(tmp_path):
    matrix = _matrix(tmp_path)
    render(ReportConfig(matrix=str(matrix), metrics=str(tmp_path / "metrics"), out=str(tmp_path / "t")))
    t2 = pd.read_csv(tmp_path / "t" / "table2.csv", dtype={"size": str})
    row = t2[(t2.model == "Qwen2") & (t2.method == "ATLANTIS") & (t2.metric == "truthfulqa_mc1")].iloc[0]
    assert row.paper == 35.62  # the paper's Table 2, transcribed
    assert row.reproduced == pytest.approx(100 * np.mean([0.52, 0.54, 0.56]))
    assert row.difference == pytest.approx(row.reproduced - 35.62)
    assert row.n_seeds == 3 and row.runs == "q-large.atlantis;q-large.atlantis.seed1;q-large.atlantis.seed2"
    half = 4.303 * np.std([52, 54, 56], ddof=1) / math.sqrt(3)  # t(0.975, df 2)
    assert (row.ci_low, row.ci_high) == pytest.approx((54 - half, 54 + half))
    # Llama2 has no counterpart here: the paper's row stays, reproduced empty
    llama = t2[(t2.model == "Llama2") & (t2.metric == "truthfulqa_mc1")]
    assert len(llama) == 2 and llama.reproduced.isna().all()

    d2 = pd.read_csv(tmp_path / "t" / "table2-delta.csv", dtype={"size": str})
    d = d2[(d2.model == "Qwen2") & (d2.metric == "truthfulqa_mc1")].iloc[0]
    assert d.paper_delta == pytest.approx(35.62 - 35.37)
    assert d.reproduced_delta == pytest.approx(3.0)  # paired differences 2, 3, 4 points
    half = 4.303 * 1.0 / math.sqrt(3)
    assert (d.ci_low, d.ci_high) == pytest.approx((3 - half, 3 + half)) and bool(d.same_sign)

    t3 = pd.read_csv(tmp_path / "t" / "table3.csv")
    ifd = t3[
        (t3.model == "Qwen2")
        & (t3.selection == "ifd")
        & (t3.rate == 0.05)
        & (t3.method == "ATLANTIS")
        & (t3.metric == "truthfulqa_mc1")
    ]
    assert ifd.paper.item() == 35.99 and ifd.reproduced.item() == pytest.approx(52.0)
    t4 = pd.read_csv(tmp_path / "t" / "table4.csv", keep_default_na=False)
    sft = t4[(t4.model == "Qwen2") & (t4.weights_from == "N/A") & (t4.metric == "truthfulqa_mc1")]
    assert sft.paper.item() == 35.37 and sft.runs.item() == "q-large.sft;q-large.sft.seed1;q-large.sft.seed2"
    cross = t4[(t4.model == "Qwen2") & (t4.weights_from == "Gemma2") & (t4.metric == "truthfulqa_mc1")]
    assert cross.paper.item() == 36.23 and cross.runs.item() == "q-large.atlantis.cross-g"
    d7 = pd.read_csv(tmp_path / "t" / "table7-delta.csv")
    proxy = d7[(d7.arm == "proxy-tuning") & (d7.metric == "mtbench_single")].iloc[0]
    assert proxy.paper_delta == pytest.approx(3.76 - 7.44) and proxy.reproduced_delta == pytest.approx(3.0 - 5.0)
    assert proxy.n_seeds == 1 and math.isnan(proxy.ci_low)

    prov = json.loads((tmp_path / "t" / "provenance.json").read_text())
    assert prov["config_sha256"] == provenance.config_hash(json.loads(matrix.read_text())["config"])
    rec = prov["runs"]["q-large.atlantis.seed2"]
    assert rec["seed"] == 2
    path = tmp_path / "metrics" / "q-large.atlantis.seed2.json"
    assert rec["metrics_sha256"] == {str(path): provenance.file_sha256(path)}


def test_rendered_tables_contain_the_papers_numbers_exactly(tmp_path):
    matrix = _matrix(tmp_path)
    render(ReportConfig(matrix=str(matrix), metrics=str(tmp_path / "metrics"), out=str(tmp_path / "t")))
    for name in TABLES:
        md = (tmp_path / "t" / f"{name}.md").read_text()
        tex = (tmp_path / "t" / f"{name}.tex").read_text()
        raw = (PAPER / f"{name}.csv").read_text().splitlines()
        header = raw[0].split(",")
        keys = TABLES[name][0]
        for line in raw[1:]:
            for col, cell in zip(header, line.split(",")):
                if col not in keys:
                    value = f"{float(cell):.2f}"  # as transcribed (two decimals; Arena-Hard's "3.9" -> 3.90)
                    assert f"{value} / " in md and f"{value} / " in tex, (name, col, cell)


def test_alpacaeval_hard_is_the_raw_win_rate_with_the_length_controlled_one_beside_it(tmp_path):
    """Table 2 compares the paper's AlpacaEval columns with the raw win rate and shows 2.0's length-controlled
    win rate beside Hard (ours only), as the AlpacaEval rule writes them (metrics/<run>/alpacaeval_<level>.json)."""
    matrix = _matrix(tmp_path)
    m = json.loads(matrix.read_text())
    m["report"]["metrics"] |= {
        "alpacaeval_easy": {"metric": "alpacaeval_easy"},
        "alpacaeval_hard": {"metric": "alpacaeval_hard"},
    }
    matrix.write_text(json.dumps(m))
    for run, r in m["runs"].items():
        s = r.get("seed", 0)
        atl = r["method"] == "atlantis"
        (tmp_path / "metrics" / run).mkdir()
        easy = {"metrics": {"alpacaeval_easy": 70.0 + s}, "alpaca_eval": {"length_controlled_winrate": None}}
        hard = {"alpacaeval_hard": 6.0 + s + atl, "alpacaeval_hard_lc": 9.0 + s + 2 * atl}
        if run == "g-large.sft":  # the package could not compute it: null in the file, no metric
            del hard["alpacaeval_hard_lc"]
        (tmp_path / "metrics" / run / "alpacaeval_easy.json").write_text(json.dumps(easy))
        (tmp_path / "metrics" / run / "alpacaeval_hard.json").write_text(json.dumps({"metrics": hard}))
    render(ReportConfig(matrix=str(matrix), metrics=str(tmp_path / "metrics"), out=str(tmp_path / "t")))
    t2 = pd.read_csv(tmp_path / "t" / "table2.csv", dtype={"size": str})
    q = t2[(t2.model == "Qwen2") & (t2.method == "ATLANTIS")].set_index("metric")
    assert list(q.index[-4:]) == ["alpacaeval_easy", "alpacaeval_hard", "alpacaeval_hard_lc", "arena_hard_auto"]
    assert (q.loc["alpacaeval_hard", "paper"], q.loc["alpacaeval_hard", "reproduced"]) == (6.51, pytest.approx(8.0))
    assert math.isnan(q.loc["alpacaeval_hard_lc", "paper"]) and q.loc["alpacaeval_hard_lc", "reproduced"] == 12.0
    g = t2[(t2.model == "Gemma2") & (t2.method == "SFT") & (t2.metric == "alpacaeval_hard_lc")].iloc[0]
    assert g.n_seeds == 2 and g.reproduced == pytest.approx(10.5)  # seeds 1 and 2 only
    d2 = pd.read_csv(tmp_path / "t" / "table2-delta.csv", dtype={"size": str})
    d = d2[(d2.model == "Qwen2") & (d2.metric == "alpacaeval_hard_lc")].iloc[0]
    assert d.reproduced_delta == pytest.approx(2.0) and math.isnan(d.paper_delta)
    md = (tmp_path / "t" / "table2.md").read_text()
    assert "alpacaeval_hard: raw win rate (paper / ours)" in md and "6.51 / 8.00" in md
    assert "alpacaeval_hard_lc: length-controlled win rate, not in the paper (paper / ours)" in md
    assert "– / 12.00" in md and "compared with the package's raw win rate" in md
    assert "`alpacaeval_hard_lc` ← `alpacaeval_hard_lc`" in md
    # tables without AlpacaEval columns are unchanged
    t3 = (tmp_path / "t" / "table3.md").read_text()
    assert "alpacaeval_hard_lc" not in t3 and "AlpacaEval:" not in t3
    # Table 3 says who scored each selector's IFD (the released defaults unless the profile says otherwise)
    assert "Selection scorers: IFD ← the base being fine-tuned." in t3  # the selectors of this matrix: ifd


def test_a_missing_metrics_file_is_named(tmp_path):
    matrix = _matrix(tmp_path)
    (tmp_path / "metrics" / "g-large.sft.seed1.json").unlink()
    with pytest.raises(ReportError, match=r"g-large\.sft\.seed1\.json: no metrics"):
        render(ReportConfig(matrix=str(matrix), metrics=str(tmp_path / "metrics"), out=str(tmp_path / "t")))


def test_report_spec_is_validated():
    base = {"config": {"large": {"a": {}}}, "report": {"stands_for": {"b": "Qwen2-7B"}}}
    with pytest.raises(ReportError, match="unknown large models"):
        Spec.from_matrix(base)
    with pytest.raises(ReportError, match="is not '<model>-<size>'"):
        Spec.from_matrix({"config": {"large": {"a": {}}}, "report": {"stands_for": {"a": "Qwen2"}}})
    with pytest.raises(ReportError, match="expected"):
        Spec.from_matrix({"config": {"large": {}}, "report": {"metrics": {"truthfulqa_mc1": "mc1"}}})
    with pytest.raises(ReportError, match="no `report` section"):
        Spec.from_matrix({"config": {"large": {}}})


def _weights(path: Path, ids, w, raw):
    pd.DataFrame({"id": ids, "weight": w, "log_weight_raw": raw}).to_parquet(path)


def test_figures_and_the_disagreement_rate(tmp_path):
    matrix = _matrix(tmp_path)
    wdir = tmp_path / "weights"
    wdir.mkdir()
    ids = [f"s{i}" for i in range(10)]
    # normalised weights: q above 1 on s0-s4, g above 1 on s0-s2 and s5 -> disagree on s3, s4, s5 (3 of 10)
    wq = np.array([2, 2, 2, 2, 2, 0.5, 0.5, 0.5, 0.5, 0.5])
    wg = np.array([2, 2, 2, 0.5, 0.5, 2, 0.5, 0.5, 0.5, 0.5])
    _weights(wdir / "q.parquet", ids, wq, np.log(wq))
    _weights(wdir / "g.parquet", ids, wg, -np.log(wg))  # raw: g above a ratio of 1 on s3, s4, s6-s9
    cfg = FiguresConfig(
        matrix=str(matrix), weights=str(wdir), metrics=str(tmp_path / "metrics"), out=str(tmp_path / "f"), samples=10
    )
    written = render_figures(cfg)
    for stem in ("fig2", "fig3", "fig3-radar", "fig4"):
        for ext in ("png", "pdf"):
            path = tmp_path / "f" / f"{stem}.{ext}"
            assert path in written and path.stat().st_size > 1000
    stats = json.loads((tmp_path / "f" / "fig4.json").read_text())
    assert stats["samples"] == 10 and stats["disagreement_normalised"] == pytest.approx(0.3)
    assert stats["disagreement_raw_ratio"] == pytest.approx(0.7)  # s0-s2 and s6-s9
    assert stats["mean"]["q"] == pytest.approx(1.25)


def test_srun_prefix_and_slurm_environment():
    assert srun_prefix(1, 1, 0) == ""
    line = srun_prefix(16, 2, 16, cpus_per_task=8)
    assert "srun --kill-on-bad-exit=1 --nodes=2 --ntasks=16 --cpus-per-task=8 --gpus-per-task=1 " in line
    assert "export MASTER_ADDR=" in line and "MASTER_PORT=" in line
    with pytest.raises(ValueError, match="one task per GPU"):
        srun_prefix(8, 1, 16)
    step = {
        "SLURM_PROCID": "9",
        "SLURM_STEP_NUM_TASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "29500",
    }
    assert torch_env_from_slurm(step) == {
        "RANK": "9",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "1",
        "NODE_RANK": "1",
        "LOCAL_WORLD_SIZE": "8",
    }
    bound = torch_env_from_slurm({**step, "CUDA_VISIBLE_DEVICES": "5"})  # --gpus-per-task=1: its only GPU
    assert bound["LOCAL_RANK"] == "0" and bound["LOCAL_WORLD_SIZE"] == "1"
    # the batch script itself (SLURM_NTASKS set, no step) and a torchrun child are left alone
    assert torch_env_from_slurm({"SLURM_PROCID": "0", "SLURM_NTASKS": "16"}) == {}
    assert torch_env_from_slurm({**step, "RANK": "3"}) == {}
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        torch_env_from_slurm({k: v for k, v in step.items() if k != "MASTER_ADDR"})


def test_config_hash_ignores_key_order():
    assert provenance.config_hash({"a": 1, "b": [1, 2]}) == provenance.config_hash({"b": [1, 2], "a": 1})
    assert provenance.config_hash({"a": 1}) != provenance.config_hash({"a": 2})


def test_pip_requirements_from_a_conda_file(tmp_path):
    from atlantis.envs import EnvError, pip_requirements

    spec = tmp_path / "envs" / "x.yaml"
    spec.parent.mkdir()
    spec.write_text("dependencies:\n  - python=3.11\n  - pip\n  - pip:\n      - openai<1\n      - -e ../pkg[extra]\n")
    assert pip_requirements(spec) == ["openai<1", f"-e {(tmp_path / 'pkg').resolve()}[extra]"]
    (tmp_path / "bad.yaml").write_text("dependencies:\n  - python=3.11\n")
    with pytest.raises(EnvError, match="no `pip:` list"):
        pip_requirements(tmp_path / "bad.yaml")
    # every shipped environment file has one
    for path in (ROOT / "workflow" / "envs").glob("*.yaml"):
        assert pip_requirements(path), path


@pytest.mark.slow
def test_pip_env_is_built_once_and_reused(tmp_path):
    from atlantis.envs import EnvConfig, build

    spec = tmp_path / "six.yaml"
    spec.write_text("dependencies:\n  - pip:\n      - six\n")
    cfg = EnvConfig(spec=str(spec), out=str(tmp_path / "env"))
    python = build(cfg)
    assert subprocess.run([str(python), "-c", "import six"]).returncode == 0
    stamp = (tmp_path / "env" / "atlantis-env.json").stat().st_mtime_ns
    assert build(cfg) == python and (tmp_path / "env" / "atlantis-env.json").stat().st_mtime_ns == stamp


def test_benchmark_files_merge_into_a_runs_metrics(tmp_path):
    from atlantis.report import read_metrics

    (tmp_path / "r.json").write_text(json.dumps({"metrics": {"mc1": 0.5}, "provenance": {"seed": 1}}))
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "mtbench.json").write_text(json.dumps({"metrics": {"mtbench_single": 6.0}}))
    rec = read_metrics(tmp_path, "r")
    assert rec["metrics"] == {"mc1": 0.5, "mtbench_single": 6.0} and rec["provenance"] == {"seed": 1}
    (tmp_path / "r" / "again.json").write_text(json.dumps({"metrics": {"mc1": 0.7}}))
    with pytest.raises(ReportError, match=r"again\.json: metric\(s\) \['mc1'\] already given"):
        read_metrics(tmp_path, "r")


def test_fig3_draws_paired_deltas_with_their_intervals(tmp_path):
    """Fig. 3's numbers: ATLANTIS − SFT paired by seed (0.02, 0.03, 0.04 on mc1), the t-interval by hand; a metric
    that does not move has Δ 0 and a zero-width interval."""
    from atlantis.figures import _radar_factor, paired_deltas

    matrix = json.loads(_matrix(tmp_path).read_text())
    rows = {r["metric"]: r for r in paired_deltas(tmp_path / "metrics", matrix, "q-large", ["mc1", "judge", "missing"])}
    assert set(rows) == {"mc1", "judge"}
    half = 4.303 * 0.01 / math.sqrt(3)  # t(0.975, 2) x sd(0.02, 0.03, 0.04) / sqrt(3)
    assert rows["mc1"]["delta"] == pytest.approx(0.03)
    assert (rows["mc1"]["lo"], rows["mc1"]["hi"]) == (pytest.approx(0.03 - half), pytest.approx(0.03 + half))
    assert rows["mc1"]["sft"] == pytest.approx(0.51) and rows["mc1"]["n"] == 3
    assert rows["judge"]["delta"] == rows["judge"]["lo"] == rows["judge"]["hi"] == 0.0
    # the radar's common scale: fractions x100, MT-Bench's grade x10, percentages as they are, others left off
    assert _radar_factor("mc1", [0.5, 0.53]) == 100.0 and _radar_factor("mtbench_single", [6.2, 6.4]) == 10.0
    assert _radar_factor("alpacaeval_hard", [52.5, 52.7]) == 1.0 and _radar_factor("kl", [-1.0, 130.0]) is None
