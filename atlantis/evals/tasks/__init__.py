"""lm-eval task definitions of the tiny world (YAML) and the document/result functions they name."""
