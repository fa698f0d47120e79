"""One operation of the integer program (FQ-ViT, arXiv 2111.13824): what :mod:`models.integer.ops`
executes and :mod:`models.integer.program` lists; its own module so that neither imports the other."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Node"]


@dataclass
class Node:
    """One integer operation: ``op`` (a key of :data:`models.integer.ops.OPS`) on ``inputs``, writing
    ``outputs``; ``consts`` are its integer (for the two ends, float) arrays, ``attrs`` its scalars."""

    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    consts: dict[str, np.ndarray] = field(default_factory=dict)
