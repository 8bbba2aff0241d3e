"""atlantis: reproduction harness for "ATLANTIS: Weak-to-Strong Learning via Importance Sampling".

Modules, one job each: `data` (read and normalise SFT records), `render` (chat templates, token ids and
response masks), `models` (safe model/tokenizer loading), `scoring` (batched response log-probabilities),
`weights` (importance weights from log-prob columns), `selection` (IFD / Superfiltering), `loss` (the
weighted NLL), `train` (weighted SFT on the HF Trainer / DeepSpeed), `proxy` (proxy-tuning, Eq. 9),
`generate` (answers in FastChat's format), `plan` (the workflow's job and GPU-hour table), `world` (the tiny
world: `data`, `models`, `build`, `metrics`, `experiment`), `cli`.
"""

__version__ = "0.1.0"
