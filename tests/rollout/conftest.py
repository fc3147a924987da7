"""Fixtures shared by the rollout tests."""

import numpy as np
import pytest

from vlcot.trace import build_prompt


@pytest.fixture(scope="module")
def prompts(tiny_policy):
    """Prompts that continue a partial trace, each ending where one stage's image opens."""
    from tests.rewards.helpers import make_trace
    from vlcot.trace import serialise_response

    codec, lay = tiny_policy.codec, tiny_policy.layout
    base = build_prompt(np.random.default_rng(0).integers(0, 16384, (16, 16)), codec, lay)
    full = serialise_response(make_trace(), codec, lay)
    starts = [i for i, t in enumerate(full) if t == lay.image_start]
    out = {stage: base + full[: starts[k] + 1] for k, stage in enumerate(("rough_image", "middle_image", "final_image"))}
    out["base"] = base
    return out
