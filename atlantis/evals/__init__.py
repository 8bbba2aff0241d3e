"""Benchmarks through their real packages (lm-eval, fschat, alpaca-eval) and Arena-Hard-Auto's protocol."""
