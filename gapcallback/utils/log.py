"""The library's logger: one line per long or unusual step, shown by default like Lightning's.

``logging.getLogger("gapcallback")`` gets a stream handler at INFO level when the application
has configured no logging of its own (the same rule Lightning applies to ``lightning.pytorch``),
so a user sees "preparing data ... done in 3.2 s" without any set-up, and silences it with
``logging.getLogger("gapcallback").setLevel(logging.WARNING)``.
"""

from __future__ import annotations

import logging

__all__ = ["get_logger"]

_ROOT = "gapcallback"


def _configure() -> logging.Logger:
    logger = logging.getLogger(_ROOT)
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[gapcallback] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


_configure()


def get_logger(name: str = "") -> logging.Logger:
    """The ``gapcallback`` logger, or its child ``gapcallback.<name>``."""
    return logging.getLogger(f"{_ROOT}.{name}" if name else _ROOT)
