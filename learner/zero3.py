"""DeepSpeed ZeRO-3's parameter trace, driven by the learner's own passes (DeepSpeed 0.19.x).

ZeRO-3 prefetches parameters only along a completed trace: the order in which submodules
fetched their parameters during one pass (a forward and its backward). DeepSpeed records and
checks that order between two calls of `PartitionedParameterCoordinator.reset_step()`, and
makes that call only from a forward pre-hook on the root module
(`runtime/zero/parameter_offload.py`). The learner never runs the root forward: it runs
`model.model` and then the chunked lm_head itself, so that full logits never exist. Left
alone the trace stays INVALID, every submodule is gathered synchronously and prefetch never
engages (`partitioned_param_coordinator.py`: "don't prefetch if we dont have a completed
model trace").

`ZeroTrace` makes the call at the end of every pass instead (after a training micro-batch's
backward, after a forward-only pass) and once when the engine starts: INVALID -> RECORD at
start, RECORD -> COMPLETE when the first pass ends, prefetch from the second pass on. Every rank
must take the same path through the coordinator's states: while not COMPLETE, `reset_step`
compares the recorded module order across ranks (a collective). So the module order of a pass
must not depend on the data — the learner's lm_head is one call per pass whatever the
sequence length (`learner.logprobs.ChunkedLMHead`). A pass that still differs (a forward
without backward after a training trace) makes DeepSpeed invalidate and re-record on every
rank alike; only speed depends on the trace, never results.
"""

from __future__ import annotations

from typing import Any, Optional


def begin_forward(ds_engine: Any) -> None:
    """What `DeepSpeedEngine.forward` does first and the learner's own passes (which never call
    it) would skip: a ZeRO optimizer's `clear_backward_seen_flag()`. Under ZeRO-3 that call is
    also where the micro-step counter advances after a backward (`stage3.py`,
    `clear_backward_seen_flag`), and the counter decides whether a micro-batch's gradient
    partitions are copied (micro step 0) or added to what earlier micro-batches left
    (`partition_grads`). Skipped, every micro-batch of an optimizer step replaced the gradient
    of the one before, and a step trained on its last micro-batch only. Call it before each
    training micro-batch's forward."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    opt = getattr(ds_engine, "optimizer", None)
    if isinstance(opt, ZeROOptimizer):
        opt.clear_backward_seen_flag()


def coordinator_of(ds_engine: Any):
    """The ZeRO-3 parameter coordinator of a DeepSpeed engine (with or without an optimizer),
    None below stage 3."""
    opt = getattr(ds_engine, "optimizer", None)
    offload = getattr(opt, "parameter_offload", opt)  # stage-3 optimizer, or DeepSpeedZeRoOffload itself
    get = getattr(offload, "get_param_coordinator", None)
    return get() if get is not None else None


class ZeroTrace:
    """Ends the passes of one ZeRO-3 engine for its parameter coordinator."""

    def __init__(self, coordinator):
        self.coordinator = coordinator
        self.coordinator.reset_step()  # INVALID -> RECORD: the first pass records the trace

    @classmethod
    def of(cls, ds_engine: Any) -> Optional["ZeroTrace"]:
        """A trace driver for a ZeRO-3 engine; None for any other (nothing to drive)."""
        coordinator = coordinator_of(ds_engine)
        return cls(coordinator) if coordinator is not None else None

    def end_pass(self) -> None:
        """One pass is over (all ranks call it at the same point)."""
        self.coordinator.reset_step()

    @property
    def state(self) -> str:
        """"COMPLETE", "RECORD" or "INVALID"."""
        c = self.coordinator
        return "COMPLETE" if c.is_complete_trace() else "RECORD" if c.is_record_trace() else "INVALID"
