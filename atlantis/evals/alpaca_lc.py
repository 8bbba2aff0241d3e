"""AlpacaEval 2.0's length-controlled win rate, computed by the alpaca-eval package itself.

Run with the alpaca-eval environment's interpreter (it imports `alpaca_eval`, not `atlantis`):

    python alpaca_lc.py ANNOTATIONS_JSON WEIGHTS_DIR OUT_JSON

It reads the annotations that `alpaca_eval evaluate` saved and calls
`alpaca_eval.metrics.get_length_controlled_winrate` on them, as the package's own recomputation does
(`evaluate(is_recompute_metrics_only=True)` reads the same `annotations.json` with `pd.read_json`). OUT_JSON gets
`{"metrics": {...}}` (every number the package returned) or `{"error": "<exception>: <message>"}` when the
package could not compute it, plus the warnings the package logged (e.g. its "very different from the raw one")
and, when found, which `df_gamed.csv` (Hub dataset tatsu-lab/alpaca_eval) the GLM used. Exit status 0 either way:
the caller records the reason; a missing metric is never silent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys


class _Keep(logging.Handler):
    """The package's own warnings (`logging.warning` on the root logger, or its `alpaca_eval.*` loggers)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "root" or record.name.startswith("alpaca_eval"):
            self.messages.append(record.getMessage())


def _plain(value):
    """numpy scalars -> JSON numbers; NaN -> None."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and value != value else value


def _df_gamed() -> dict | None:
    """The cached `df_gamed.csv` the GLM read (instruction difficulties and the gamed baselines' annotations)."""
    try:
        from alpaca_eval import constants
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(
            "tatsu-lab/alpaca_eval", "df_gamed.csv", cache_dir=constants.DEFAULT_CACHE_DIR, repo_type="dataset"
        )
    except Exception:  # provenance only: the metric itself is already computed
        return None
    if not isinstance(path, str):
        return None
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    parts = path.replace("\\", "/").split("/")
    revision = parts[parts.index("snapshots") + 1] if "snapshots" in parts else None
    return {"path": path, "revision": revision, "sha256": sha}


def _versions() -> dict:
    """The packages the number depends on (the GLM is scikit-learn's LogisticRegressionCV on a patsy design)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("alpaca-eval", "scikit-learn", "pandas", "numpy", "patsy", "huggingface-hub"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def main(argv: list[str]) -> int:
    annotations, weights_dir, out = argv
    keep = _Keep()
    logging.getLogger().addHandler(keep)
    result: dict = {}
    try:
        import pandas as pd
        from alpaca_eval import metrics

        df = pd.read_json(annotations)
        got = metrics.get_length_controlled_winrate(df, save_weights_dir=weights_dir)
        result["metrics"] = {k: _plain(v) for k, v in got.items()}
        result["df_gamed"] = _df_gamed()
    except Exception as err:  # recorded with its reason by the caller (atlantis.evals.alpaca)
        result["error"] = f"{type(err).__module__}.{type(err).__name__}: {err}"
    result["warnings"] = keep.messages
    result["versions"] = _versions()
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
