"""The transcribed paper tables: complete, consistent across tables, and every number found in the paper."""

import csv
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
TABLES = ROOT / "results" / "paper"
PAPER = ROOT.parent / "shared" / "paper" / "atlantis-paper.txt"
TRUTH_MT = ["truthfulqa_mc1", "truthfulqa_mc2", "mtbench_single", "mtbench_pairwise"]


def _read(n: int) -> list[dict]:
    with (TABLES / f"table{n}.csv").open() as fh:
        return list(csv.DictReader(fh))


def _row(rows, **match):
    (hit,) = [r for r in rows if all(r[k] == v for k, v in match.items())]
    return [hit[m] for m in TRUTH_MT]


def test_shapes():
    assert len(_read(2)) == 6 and len(_read(3)) == 26 and len(_read(4)) == 6 and len(_read(5)) == 8
    assert len(_read(7)) == 3


def test_shared_rows_agree_across_tables():
    """The paper reuses runs across tables; the transcription must give them the same numbers."""
    t2, t3, t4, t5, t7 = _read(2), _read(3), _read(4), _read(5), _read(7)
    for model, size in (("Qwen2", "7B"), ("Gemma2", "9B")):
        sft, atl = _row(t2, model=model, method="SFT"), _row(t2, model=model, method="ATLANTIS")
        assert _row(t3, model=model, selection="none") == atl  # Table 3's "No selection"
        assert _row(t4, model=model, weights_from="N/A") == sft  # Table 4's SFT row
        assert _row(t4, model=model, weights_from=model) == atl
        assert _row(t5, model=model, size=size, method="SFT") == sft
        assert _row(t5, model=model, size=size, method="ATLANTIS") == atl
    assert _row(t7, method="SFT") == _row(t2, model="Qwen2", method="SFT")
    assert _row(t7, method="ATLANTIS") == _row(t2, model="Qwen2", method="ATLANTIS")


@pytest.mark.skipif(not PAPER.is_file(), reason="the paper's text is not next to this checkout")
def test_every_number_is_in_the_paper():
    text = PAPER.read_text()
    for n in (2, 3, 4, 5, 7):
        for row in _read(n):
            for key, value in row.items():
                if key in ("rate",) or not value[:1].isdigit():
                    continue
                assert value in text, f"table{n}.csv {key}={value} not in the paper"
