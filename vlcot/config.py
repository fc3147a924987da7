"""Typed defaults for the task side: image sizes, token layout, VQ, policy, degradation, data.

Plain dataclasses (no OmegaConf import here): `cluster/config.py` turns them into an
OmegaConf structured config, merges yaml and CLI overrides and validates the result.
Every value the paper leaves open (degradation thresholds, probabilities) is a field here,
documented next to its default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from vlcot.conversation import ConversationConfig


@dataclass
class ImageConfig:
    """Resolutions of the VLCoT trace (paper: LR 128, HR 512; rough HR/4, middle HR/2)."""

    hr_size: int = 512  # final image side; rough = hr/4, middle = hr/2
    lr_size: int = 128  # degraded input side (hr / scale)
    prompt_size: int = 512  # the LR image is bicubic-upsampled to this before encoding
    patch_px: int = 32  # a grid token counts patches of this many pixels


@dataclass
class VQConfig:
    """LlamaGen-style VQ image tokenizer (paper: ds8, 16,384 codes, dim 8, L2-normalised).

    Defaults are LlamaGen `VQ_8` (`vq_ds8_c2i.pt`): ch 128, ch_mult (1, 2, 2, 4), 2 res
    blocks, z 256. `checkpoint` is a local `vq_ds8_c2i.pt` (LlamaGen layout) or a directory
    written by `ImageTokenizer.save`; empty means randomly initialised (tests, demo).
    """

    codebook_size: int = 16384
    codebook_dim: int = 8
    block_out_channels: List[int] = field(default_factory=lambda: [128, 256, 256, 512])
    layers_per_block: int = 2
    z_channels: int = 256
    norm_num_groups: int = 32
    checkpoint: str = ""
    weights: str = "model"  # which weights of a LlamaGen training checkpoint: model (as PURE loads) | ema
    seed: int = 0


@dataclass
class TextModelConfig:
    """Chameleon-architecture sizes for a policy built from config (the tiny test policy)."""

    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 2  # head_dim 32: vLLM's CPU attention supports 32, 64, 80, ...
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    text_vocab_size: int = 640  # BPE vocabulary trained offline on the built-in corpus
    seed: int = 0


@dataclass
class SpecialTokenIds:
    """Ids of the image-span tokens in a real checkpoint's vocabulary.

    Defaults follow Lumina-mGPT / PURE (`<racm3:break>` = 8197 opens an image, `<eoss>` =
    8196 closes it, 8803 ends a row, 8804 + n is the grid token for n patches). Image-code
    tokens are found by name (`IMGIMG...Z`) in the checkpoint's `vocabulary_map`.
    Checkpoints built by this project store their own ids in config.json and ignore these.
    """

    image_start: int = 8197
    image_end: int = 8196
    row_newline: int = 8803
    grid_base: int = 8804
    max_grid: int = 64


# The transformers class name every policy folder declares (transformers' Auto classes and
# vLLM's registry resolve it); released xllmx folders declare another until imported.
STOCK_ARCHITECTURE = "ChameleonForConditionalGeneration"


def architecture_problem(architectures, path) -> str:
    """Why a policy folder declaring `architectures` cannot be loaded as it is ("" if it can)."""
    arch = (architectures or [STOCK_ARCHITECTURE])[0]
    if arch == STOCK_ARCHITECTURE:
        return ""
    return (f"{path} declares architecture {arch!r}; a released Lumina-mGPT / PURE folder must be converted once: "
            f"realsr-r1 import-policy --src {path} --out DIR")


@dataclass
class PolicyConfig:
    """Where the policy comes from: a local HF-layout checkpoint, or built tiny from config."""

    checkpoint: str = ""  # local dir with config.json + safetensors; empty = build from `model`
    model: TextModelConfig = field(default_factory=TextModelConfig)
    special_tokens: SpecialTokenIds = field(default_factory=SpecialTokenIds)
    conversation: ConversationConfig = field(default_factory=ConversationConfig)
    dtype: str = "float32"  # float32 | bfloat16 | float16: what the policy is loaded in (learner, hf engine)


@dataclass
class BlurConfig:
    """One order of Real-ESRGAN-style blur. Kernel-type probabilities are renormalised."""

    prob: float = 1.0
    kernel_sizes: List[int] = field(default_factory=lambda: [7, 9, 11, 13, 15, 17, 19, 21])
    kernel_types: List[str] = field(
        default_factory=lambda: [
            "iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso",
        ]
    )
    kernel_probs: List[float] = field(default_factory=lambda: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03])
    sigma: List[float] = field(default_factory=lambda: [0.2, 3.0])
    betag: List[float] = field(default_factory=lambda: [0.5, 4.0])  # generalised Gaussian shape
    # Real-ESRGAN draws the generalised-Gaussian beta below 1 half of the time and above 1 the
    # other half; false (ours) draws it uniformly over betag (below 1 one time in seven)
    betag_split: bool = False
    betap: List[float] = field(default_factory=lambda: [1.0, 2.0])  # plateau shape
    sinc_prob: float = 0.1  # chance the kernel is a sinc (ringing) filter instead


@dataclass
class OrderConfig:
    """One degradation order: blur -> random resize -> noise -> JPEG."""

    blur: BlurConfig = field(default_factory=BlurConfig)
    resize_probs: List[float] = field(default_factory=lambda: [0.2, 0.7, 0.1])  # up, down, keep
    resize_range: List[float] = field(default_factory=lambda: [0.15, 1.5])
    gaussian_noise_prob: float = 0.5  # else Poisson
    noise_sigma: List[float] = field(default_factory=lambda: [1.0, 30.0])  # in 0..255 units
    poisson_scale: List[float] = field(default_factory=lambda: [0.05, 3.0])
    gray_noise_prob: float = 0.4
    noise_prob: float = 0.9  # chance any noise is added in this order
    jpeg_prob: float = 0.9
    jpeg_quality: List[int] = field(default_factory=lambda: [30, 95])


def _second_order() -> OrderConfig:
    return OrderConfig(
        blur=BlurConfig(prob=0.8, sigma=[0.2, 1.5], sinc_prob=0.1),
        resize_probs=[0.3, 0.4, 0.3],
        resize_range=[0.3, 1.2],
        noise_sigma=[1.0, 25.0],
        poisson_scale=[0.05, 2.5],
    )


@dataclass
class LabelThresholds:
    """Edges that map measured degradation strengths to the five published slot words.

    Level words are none < light < medium < heavy; a value v gets the word of the first
    edge e with v < e (so an edge value itself belongs to the stronger level).

    - blur_sigma: effective blur std in HR pixels: sqrt(s1^2 + (s2/r1)^2) where s_i is the
      measured std of order i's kernel (0 if skipped, sinc kernels included) and r1 the
      first resize factor (order 2 blurs an image already resized by r1).
    - noise_std: RMS of the noise actually added, in 0..255 units, both orders combined
      in quadrature.
    - jpeg_quality: the lowest JPEG quality applied (no JPEG = 100). Lower quality is
      stronger, so a quality q gets the word of the first edge e with q > e, walking
      the edges from none to heavy: q > 80 none, q > 60 light, q > 40 medium, else heavy.
    - resize_tolerance: the first-order random resize factor within 1 +- tol is "keep"; below is
      "downsample", above "upsample". Same rule for the final resize to the LR size
      (LR side / side before the final resize).

    Defaults were chosen on 300 draws of the default synthesis (bench/label_balance.py
    prints the split) so that each word is common: blur 13/36/26/25 %, noise
    11/22/33/34 %, compression 15/22/38/25 % (none/light/medium/heavy). Re-tune them with
    that script when you change the synthesis ranges.
    """

    blur_sigma: List[float] = field(default_factory=lambda: [1.2, 2.5, 4.5])
    noise_std: List[float] = field(default_factory=lambda: [6.0, 15.0, 25.0])
    jpeg_quality: List[float] = field(default_factory=lambda: [80.0, 60.0, 40.0])
    resize_tolerance: float = 0.05


@dataclass
class DegradationConfig:
    """Real-ESRGAN-style second-order synthesis (defaults follow Real-ESRGAN's x4 recipe)."""

    first: OrderConfig = field(default_factory=OrderConfig)
    second: OrderConfig = field(default_factory=_second_order)
    second_order_prob: float = 0.8  # chance the second order runs at all
    final_sinc_prob: float = 0.8
    thresholds: LabelThresholds = field(default_factory=LabelThresholds)


@dataclass
class DataConfig:
    """`prepare-data`: where images come from and what counts as usable."""

    input_dir: str = ""  # folder of HQ images; empty = the built-in sample set
    output_dir: str = "runs/data"
    manifest: str = ""  # default: <output_dir>/manifest.jsonl
    # the cold-start SFT set and the GRPO prompt set (empty = the manifest). The paper trains RL
    # on a separate, smaller set (about 500 images) than SFT; both are manifests prepare-data wrote.
    sft_manifest: str = ""
    rl_manifest: str = ""
    # a missing caption or tag stops prepare-data (naming the images) instead of being counted
    # and warned about: SFT would teach "A photograph." and the understanding reward would be 0
    require_annotations: bool = False
    # Real-ESRGAN's USM-sharpened ground truth: the HR target is unsharp-masked (radius 50,
    # weight 0.5, threshold 10) while the LR is still degraded from the unsharpened HR
    usm_hr: bool = False
    min_side: int = 128  # smaller HQ images are skipped (counted, with the reason)
    max_pixels: int = 80_000_000  # larger images are skipped before decoding (PIL's bomb guard is ~89M)
    variants_per_image: int = 1  # degraded LR copies per HQ image (different seeds)
    seed: int = 1234
