"""One logger for the package; only rank 0 speaks at INFO level under torchrun/accelerate."""

from __future__ import annotations

import logging
import os

_ROOT = "atlantis"


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the package logger once; ranks other than 0 only report warnings."""
    logger = logging.getLogger(_ROOT)
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    prefix = f"[rank {rank()}] " if world_size() > 1 else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level if rank() == 0 else logging.WARNING)
