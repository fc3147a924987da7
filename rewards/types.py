"""What crosses the reward role's boundary: one sample to score, and its scores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from vlcot.trace import ParsedTrace


@dataclass
class RewardInput:
    """One generated sample and its references."""

    sample_id: str
    parsed: ParsedTrace
    labels: List[str]  # the five degradation words of the LR image
    tags: List[str]  # reference object tags
    hr_path: Optional[str] = None  # for the optional fidelity term


@dataclass
class RewardResult:
    sample_id: str
    total: float
    components: Dict[str, float]  # one entry per reward named in rewards.weights
    details: Dict[str, Any] = field(default_factory=dict)
    nonfinite: List[str] = field(default_factory=list)  # components that were NaN/inf and replaced
    final_image: Optional[np.ndarray] = None  # uint8 [H, W, 3] when requested
