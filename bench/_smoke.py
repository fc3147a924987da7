"""Building blocks of bench/gpu_smoke.py: the shapes, the released token layout, a random
Chameleon built on the device, synthetic traces, a host-read counter and the learner's memory
estimate. Imports only torch, numpy, transformers and the project's vlcot/ (no omegaconf, Ray,
DeepSpeed or vLLM), so it runs on a bare GPU machine.
"""

from __future__ import annotations

import traceback

from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

# Packages the GPU machine does not have; the smoke must never import them (checked at the end).
ABSENT_ON_GPU = ("omegaconf", "ray", "deepspeed", "vllm", "mlflow", "pyiqa")
END_TOKEN, BOS, PAD = 8710, 0, 1  # <reserved08706> ends turns; <s>; <pad> (REAL-CHECKPOINT.md)
TEXT_IDS = (9000, 9600)  # plain text ids in the released-layout fixture (tests/released_checkpoint.py)
CODES = 16384


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    hr_size: int  # final image side: codes per side = hr_size / 8
    decode_lr_px: int  # side of the LR image in the decode prompt (short: the smoke's budget)
    trace_lr_px: int  # side of the LR image in the learner trace (the paper's 512 px: 4,164 tokens)
    trace_tokens: int  # learner trace length
    chunk: int  # log-prob chunk (learner.logprob_chunk)
    vq: str  # vq.checkpoint: "" = random LlamaGen VQ_8, or builtin:tiny-vq
    vq_batch: int
    samples: int = 1  # samples drawn together (G); each has its own unconditional branch
    decode_budget_s: float = 300.0
    max_model_len: int = 11776  # the released max_seq_len


GPU = Shape(32, 4096, 32, 11008, 73728, hr_size=512, decode_lr_px=128, trace_lr_px=512, trace_tokens=10000,
            chunk=1024, vq="", vq_batch=8)
CPU = Shape(2, 64, 2, 176, 73728, hr_size=128, decode_lr_px=64, trace_lr_px=64, trace_tokens=512, chunk=128,
            vq="builtin:tiny-vq", vq_batch=2, decode_budget_s=120.0)


class StageError(RuntimeError):
    """A stage failed with measurements worth keeping (`partial`)."""

    def __init__(self, message: str, partial: Optional[dict] = None):
        super().__init__(message)
        self.partial = partial or {}


# ---- building blocks ------------------------------------------------------------------------
def released_layout():
    """The PURE-7B token layout: 16,384 LlamaGen codes on ids 4-8195 and 65536-73727."""
    from vlcot.config import SpecialTokenIds
    from vlcot.layout import TokenLayout, image_code_name

    names = {image_code_name(c): (4 + c if c < 8192 else 65536 + c - 8192) for c in range(CODES)}
    return TokenLayout.from_vocabulary_map(names, **asdict(SpecialTokenIds()), codebook_size=CODES)


def build_policy(shape: Shape, layout, device: torch.device, dtype=torch.bfloat16):
    """A random Chameleon of `shape`, parameters created in `dtype` directly on `device`."""
    from transformers import ChameleonConfig

    from vlcot.layout import image_code_name
    from vlcot.policy import MINIMAL_CHAMELEON_VQ, UnmaskedChameleonForConditionalGeneration, freeze_unused

    vocab_map = {image_code_name(c): int(layout.code_ids[c]) for c in range(CODES)}
    vocab_map.update({"<s>": BOS, "<pad>": PAD, "</s>": 2, "<eoss>": layout.image_end,
                      "<racm3:break>": layout.image_start, "<image>": 8900})
    config = ChameleonConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        max_position_embeddings=shape.max_model_len, rms_norm_eps=1e-5, bos_token_id=BOS, pad_token_id=PAD,
        eos_token_id=2, vocabulary_map=vocab_map, vq_config=MINIMAL_CHAMELEON_VQ,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    config.dtype = dtype
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = UnmaskedChameleonForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    freeze_unused(model)
    return model.eval()


def random_text(rng, n: int) -> List[int]:
    return rng.integers(*TEXT_IDS, n).tolist()


def random_span(layout, rng, side_codes: int) -> List[int]:
    return layout.image_span(rng.integers(0, CODES, (side_codes, side_codes)))


def trace_prefix(layout, rules, rng, lr_px: int) -> List[int]:
    """BOS + text + LR image + text, then the rough and middle images of a response with text
    between them, ending in the final image's image_start: the context the final image is
    drawn in (rules.initial_state counts the two images, so the next grid is the final one)."""
    out = [BOS] + random_text(rng, 8) + random_span(layout, rng, lr_px // 8) + random_text(rng, 8)
    for stage in range(2):
        gh = rules.stage_grids[stage][0]
        out += random_text(rng, 6) + random_span(layout, rng, gh * rules.codes_per_patch)
    return out + random_text(rng, 6) + [layout.image_start]


def learner_trace(layout, rules, rng, lr_px: int, total: int):
    """A [1, total] trace: prompt (BOS, text, LR image, text, 8710) then a response with the
    three images, text between them and the end token. Returns (ids, prompt length)."""
    prompt = [BOS] + random_text(rng, 8) + random_span(layout, rng, lr_px // 8) + random_text(rng, 8) + [END_TOKEN]
    spans = [random_span(layout, rng, g[0] * rules.codes_per_patch) for g in rules.stage_grids]
    text = total - len(prompt) - sum(map(len, spans)) - 1
    if text < 4 * len(spans):
        raise StageError(f"a {total}-token trace cannot hold the prompt and the three images (they need "
                         f"{total - text + 4 * len(spans)} tokens with some text)")
    cuts = np.linspace(0, text, len(spans) + 2).astype(int)
    words = random_text(rng, text)
    response = []
    for i, span in enumerate(spans):
        response += words[cuts[i]:cuts[i + 1]] + span
    response += words[cuts[len(spans)]:] + [END_TOKEN]
    ids = prompt + response
    assert len(ids) == total
    return torch.tensor([ids]), len(prompt)


class SyncCounter:
    """Counts reads of tensor values by the host (item, tolist, bool/int/float/index, cpu,
    numpy): on CUDA each is a device synchronisation. With `cuda_only` only CUDA tensors count;
    on a CPU run every read counts (what would sync if those tensors lived on a GPU). Reads
    inside the policy's forward (between its hooks) are counted apart from the decoding rules'."""

    METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")

    def __init__(self, cuda_only: bool):
        self.cuda_only = cuda_only
        self.by_method: Dict[str, int] = {}
        self.model = 0
        self.rules = 0
        self.depth = 0
        self._saved: List = []

    def _wrap(self, name: str, orig: Callable):
        def counted(t, *a, **k):
            if not self.cuda_only or t.is_cuda:
                self.by_method[name] = self.by_method.get(name, 0) + 1
                if self.depth:
                    self.model += 1
                else:
                    self.rules += 1
            return orig(t, *a, **k)
        return counted

    def __enter__(self):
        for name in self.METHODS:
            own = name in torch.Tensor.__dict__
            orig = getattr(torch.Tensor, name)
            self._saved.append((name, own, orig))
            setattr(torch.Tensor, name, self._wrap(name, orig))
        return self

    def __exit__(self, *exc):
        for name, own, orig in reversed(self._saved):
            if own:
                setattr(torch.Tensor, name, orig)
            else:
                delattr(torch.Tensor, name)
        self._saved.clear()
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gb(n: float) -> float:
    return round(n / 1e9, 3)


def failure(exc: BaseException) -> Dict[str, object]:
    """A stage or pass that raised `exc` (inside its `except`), as the JSON records it: the
    error's first line, the traceback's last 12 lines, and what the GPU held when it ran out."""
    first = (str(exc).splitlines() or [""])[0]
    rec: Dict[str, object] = {"error": f"{type(exc).__name__}: {first}",
                              "traceback": traceback.format_exc().splitlines()[-12:]}
    if isinstance(exc, ModuleNotFoundError):
        rec["error"] += " (this machine lacks it: docs/gpu.md says how to carry a pure-Python wheel)"
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        rec["memory_gb"] = _gb(torch.cuda.memory_allocated())
    return rec


def memory_estimate(shape: Shape, params: int, trainable: int, positions: int) -> Dict[str, float]:
    """Bytes the learner step should peak at for this shape: the whole model on one device
    (no ZeRO) with bf16 weights and bf16 gradients, no optimizer state; activations as in the
    configs/pure-7b.yaml header (32 layers x T x 4096 x 2 B of checkpointed hidden states) plus
    one layer's recompute and one fp32 logits chunk (GPU-AUDIT.md: ~2.7 + ~2 + ~1 GB at 10k)."""
    t, h = shape.trace_tokens, shape.hidden
    parts = {
        "weights_bf16": 2.0 * params,
        "grads_bf16": 2.0 * trainable,
        "checkpointed_hidden": 2.0 * shape.layers * t * h,  # the header's 2.6 GB at 10k tokens
        "layer_recompute": 2.0 * t * (12 * h + 4 * shape.intermediate),  # q k v, norms, rope, attn, MLP
        "logits_chunk": 4.0 * 3 * min(shape.chunk, positions) * shape.vocab,  # logits, softmax, grad (fp32)
    }
    parts["total"] = sum(parts.values())
    return parts
