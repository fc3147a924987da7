"""Manifest record -> a complete VLCoT example (the cold-start SFT target).

The three images of the trace are the HR image at HR/4, HR/2 and HR (each VQ-encoded);
the understanding texts are the record's x4 / x2 / x1 captions; the degradation words are
its labels. The prompt holds the LR image bicubic-upsampled to `image.prompt_size`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

from PIL import Image

from vlcot.config import ImageConfig
from vlcot.images import open_image
from vlcot.manifest import ManifestRecord
from vlcot.trace import IMAGE_STAGE_SCALE, Trace, TextCodec, build_prompt, serialise_response
from vlcot.layout import TokenLayout

IGNORE_INDEX = -100
FALLBACK_CAPTION = "A photograph."


@dataclass
class Example:
    id: str
    prompt_ids: List[int]
    response_ids: List[int]
    trace: Trace

    def sft_pair(self) -> Tuple[List[int], List[int]]:
        """(input_ids, labels) with the prompt masked out of the loss."""
        ids = self.prompt_ids + self.response_ids
        return ids, [IGNORE_INDEX] * len(self.prompt_ids) + list(self.response_ids)


def _load(path: str) -> Image.Image:
    img, why, _ = open_image(path)
    if img is None:
        raise ValueError(f"cannot read {path}: {why}")
    return img


def build_example(record: ManifestRecord, vq, codec: TextCodec, layout: TokenLayout, image: ImageConfig) -> Example:
    """One manifest record (paths absolute, as `read_manifest` returns) -> Example."""
    hr = _load(record.hr_path)
    lr = _load(record.lr_path)
    lr_codes = vq.encode_images([lr], image.prompt_size)[0]
    grids = {stage: vq.encode_images([hr], image.hr_size // k)[0] for stage, k in IMAGE_STAGE_SCALE.items()}
    caps = record.captions
    trace = Trace(
        degradation=list(record.degradation.labels),
        rough_understand=(caps and caps.x4) or FALLBACK_CAPTION,
        middle_understand=(caps and caps.x2) or FALLBACK_CAPTION,
        final_understand=(caps and caps.x1) or FALLBACK_CAPTION,
        rough_image=grids["rough_image"],
        middle_image=grids["middle_image"],
        final_image=grids["final_image"],
    )
    return Example(
        id=record.id,
        prompt_ids=build_prompt(lr_codes, codec, layout),
        response_ids=serialise_response(trace, codec, layout),
        trace=trace,
    )
