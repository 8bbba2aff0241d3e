"""Functions the world's lm-eval tasks name: document mapping for TruthfulQA, grading for the sums.

Kept free of lm-eval imports so that lm-eval can load this file by path (`!function world.process_sums`) and
`atlantis.evals.lmeval` can import it as a module.
"""

from __future__ import annotations

from atlantis.world.data import grade


def _truthfulqa_doc(doc: dict) -> dict:
    # The world writes its records for its own format ("Q: fendra home?" + " swamp."). lm-eval's TruthfulQA
    # prompt adds "Q: " itself and joins context and choice with target_delimiter " ", like the Hub set's
    # records ("What is...?", "Yes, ..."). Without this mapping the prompt would read "Q: Q: ..." and every
    # choice would start with two spaces: a tokenisation artefact, not the benchmark.
    def targets(t: dict) -> dict:
        return {"choices": [c.strip() for c in t["choices"]], "labels": list(t["labels"])}

    return {
        "question": doc["question"].strip().removeprefix("Q:").strip(),
        "mc1_targets": targets(doc["mc1_targets"]),
        "mc2_targets": targets(doc["mc2_targets"]),
    }


def truthfulqa_docs(dataset):
    """`process_docs` for lm-eval's truthfulqa_mc1/mc2 on the world's `eval_truthfulqa.jsonl`."""
    return dataset.map(_truthfulqa_doc)


def process_sums(doc: dict, results: list[str]) -> dict[str, float]:
    """Exact match under the world's grading policy: the value the answer states is the true sum."""
    return {"exact_match": float(grade(results[0], doc["answer"]))}
