"""atlantis: reproduction harness for "ATLANTIS: Weak-to-Strong Learning via Importance Sampling".

Modules, one job each: `data` (read and normalise SFT records), `render` (chat templates, token ids and
response masks), `models` (safe model/tokenizer loading), `scoring` (batched response log-probabilities),
`weights` (importance weights from log-prob columns), `selection` (IFD / Superfiltering), `cli`.
"""

__version__ = "0.1.0"
