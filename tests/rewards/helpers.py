"""Hand-built parsed traces for reward tests."""

import numpy as np

from vlcot.trace import Trace, parse_response, serialise_response


def make_trace(degradation=("medium", "downsample", "heavy", "light", "upsample"),
               rough="A cat.", final_codes=None, seed=0):
    rng = np.random.default_rng(seed)
    return Trace(
        degradation=list(degradation),
        rough_understand=rough,
        middle_understand="middle text",
        final_understand="final text",
        rough_image=rng.integers(0, 16384, (4, 4)),
        middle_image=rng.integers(0, 16384, (8, 8)),
        final_image=rng.integers(0, 16384, (16, 16)) if final_codes is None else final_codes,
    )


def parsed_of(trace, policy, hr_size=128):
    return parse_response(serialise_response(trace, policy.codec, policy.layout), policy.codec, policy.layout, hr_size=hr_size)


def parsed_of_ids(ids, policy, hr_size=128):
    return parse_response(ids, policy.codec, policy.layout, hr_size=hr_size)
