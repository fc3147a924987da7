"""Typed defaults for the task side: image sizes, token layout, VQ, policy, degradation, data.

Plain dataclasses (no OmegaConf import here): `cluster/config.py` turns them into an
OmegaConf structured config and merges yaml and CLI overrides; vlcot/config_problems.py
says what is wrong with the result.
Every value the paper leaves open (degradation thresholds, probabilities) is a field here,
documented next to its default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

from vlcot.conversation import ConversationConfig
from vlcot.errors import UserError


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
    blocks, z 256. `checkpoint` is a local `vq_ds8_c2i.pt` (LlamaGen layout), a directory
    written by `VQTokenizer.save` / `realsr-r1 train-vq`, or `builtin:tiny-vq` (the demo's
    trained tokenizer, vlcot/builtin/tiny_vq); empty means randomly initialised from `seed`.
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


class VQCheckpointError(UserError):
    """The configured VQ tokenizer cannot be used (missing, damaged or mismatched files);
    the message names the file and the config key. Commands print it as one line."""


# The two files of a VQ tokenizer folder (`VQTokenizer.save`, `realsr-r1 train-vq`)
VQ_FILES = ("vq_config.json", "vq_model.safetensors")


def vq_folder_problem(path) -> str:
    """Why `path` is not a VQ tokenizer folder ("" if it looks like one): both files there and
    the config readable as a VQConfig. Cheap (no weights read): checked before a model loads."""
    p = Path(path)
    config, weights = (p / name for name in VQ_FILES)
    if not config.is_file():
        return f"{p} has no {config.name}: not a VQ tokenizer folder (a run's vq/, or what train-vq wrote)"
    try:
        VQConfig(**json.loads(config.read_text()))
    except (OSError, ValueError, TypeError) as exc:  # malformed JSON, not an object, unknown keys
        return f"{config} is not a VQ configuration ({str(exc).splitlines()[0]})"
    if not weights.is_file():
        return f"{p} has no {weights.name} beside its {config.name}: the folder is incomplete"
    return ""


# Tokenizers shipped inside the package, named in config as `vq.checkpoint: builtin:NAME`
BUILTIN_VQ = {"tiny-vq": Path(__file__).parent / "builtin" / "tiny_vq"}


def resolve_checkpoint(value: str) -> Path:
    """`vq.checkpoint` as a path: `builtin:NAME` is a tokenizer shipped in vlcot/builtin/."""
    if value.startswith("builtin:"):
        name = value[len("builtin:"):]
        if name not in BUILTIN_VQ:
            raise ValueError(f"no built-in tokenizer {name!r} (there is {sorted(BUILTIN_VQ)})")
        return BUILTIN_VQ[name]
    return Path(value)


@dataclass
class VQTrainConfig:
    """`realsr-r1 train-vq`: train the `vq` architecture on CPU from photographs that ship with
    the project's dependencies (vlcot/vq_train.py). Two phases: an autoencoder on the
    L2-normalised latent, then (after spherical k-means seeds the codebook from its latents)
    the quantised model with straight-through gradients, codebook and commitment losses."""

    autoencoder_steps: int = 1500   # phase 1: no codebook, the decoder learns images
    quantised_steps: int = 3500     # phase 2: the codebook in the loop
    batch_size: int = 16
    crop: int = 64                  # training crops (multiple of 8); the demo encodes 128-px images
    lr: float = 2.0e-3              # Adam; linear warm-up, then cosine to lr * min_lr_ratio
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    l1_weight: float = 1.0          # loss = mse + l1_weight * l1 + codebook + commitment * commit
    commitment: float = 0.25
    kmeans_crops: int = 2048        # latents of this many crops seed the codebook
    kmeans_iters: int = 8
    scales: List[float] = field(default_factory=lambda: [1.0, 0.7, 0.5, 0.35])  # source images resized by these
    channel_shuffle_prob: float = 0.25  # colour augmentation: a random RGB permutation
    log_every: int = 100
    threads: int = 0                # torch threads (0 = torch's default)
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


def policy_folder_problem(path, files: bool = True) -> str:
    """Why `path` is not a policy folder this project can load ("" if it is): an HF-layout
    folder whose config.json is a Chameleon-family model in the stock architecture and, with
    `files`, that holds safetensors weights and a tokenizer. Reads config.json only (cheap:
    checked before any model or actor loads it)."""
    p = Path(path)
    if not p.is_dir():
        return (f"{p} is not a folder ({'it is a file' if p.exists() else 'nothing is there'}): give an HF-layout "
                "policy folder (config.json, safetensors weights, tokenizer)")
    config = p / "config.json"
    if not config.is_file():
        return (f"{p} has no config.json: not an HF-layout policy folder (init-policy, sft, train and import-policy "
                "write one)")
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError) as exc:  # ValueError: malformed JSON or not UTF-8
        return f"{config} cannot be read as JSON ({str(exc).splitlines()[0]}): the folder's config.json is damaged"
    if not isinstance(raw, dict):
        return f"{config} holds a JSON {type(raw).__name__}, not a model configuration"
    kind = raw.get("model_type")
    if kind and kind != "chameleon":
        return (f"{p} holds a {kind!r} model ({config}), not a Chameleon-family policy: give a folder that "
                "init-policy, sft, train or import-policy (Lumina-mGPT / PURE) wrote")
    why = architecture_problem(raw.get("architectures"), p)
    if why or not files:
        return why
    if not ((p / "model.safetensors.index.json").is_file() or any(p.glob("*.safetensors"))):
        return f"{p} has no .safetensors weights beside its config.json: the folder is incomplete"
    if not ((p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()):
        return f"{p} has no tokenizer.json beside its config.json: the folder is incomplete"
    return ""


@dataclass
class PolicyConfig:
    """Where the policy comes from: a local HF-layout checkpoint, or built tiny from config."""

    checkpoint: str = ""  # local dir with config.json + safetensors; empty = build from `model`
    # how an empty `checkpoint` is built (once, under run_dir): tiny = the project's tokenizer and
    # format at `model`'s shape; released-layout = a checkpoint in the released PURE layout at
    # `model`'s width and depth (73,728 ids, its tokenizer and conversation), written by
    # vlcot/released_layout.py and converted by the importer, as import-policy converts PURE-7B
    init: str = "tiny"
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


LABEL_MEASURES = ("synthesis", "lr")


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

    # what the blur, noise and compression words measure (LABEL_MEASURES): "synthesis" (the
    # parameters drawn: blur_sigma, noise_std, jpeg_quality) or "lr" (the RMS change each effect
    # made to the LR: the lr_* edges)
    measure: str = "synthesis"
    blur_sigma: List[float] = field(default_factory=lambda: [1.2, 2.5, 4.5])
    noise_std: List[float] = field(default_factory=lambda: [6.0, 15.0, 25.0])
    jpeg_quality: List[float] = field(default_factory=lambda: [80.0, 60.0, 40.0])
    resize_tolerance: float = 0.05
    lr_blur_rms: List[float] = field(default_factory=lambda: [8.0, 13.0, 20.0])
    lr_noise_rms: List[float] = field(default_factory=lambda: [6.0, 10.0, 14.0])
    lr_jpeg_rms: List[float] = field(default_factory=lambda: [7.0, 11.0, 16.0])


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
    variants_per_image: int = 1  # degraded LR copies per HR crop (different seeds)
    # 0 = one HR per image, its centre square; N = N random square crops per image, each its
    # own HR (and LR copies), with sides from crop_min_scale to 1 of the image's short side
    crops_per_image: int = 0
    crop_min_scale: float = 0.6
    # random crops per image (one LR each) written to heldout.jsonl beside the manifest, never into
    # it: crop boxes and degradation draws no training prompt has (`trainer.heldout_eval` scores them)
    heldout_per_image: int = 0
    heldout_manifest: str = ""  # default: heldout.jsonl beside the manifest
    seed: int = 1234


@dataclass
class AnnotateConfig:
    """`realsr-r1 annotate`: captions (three levels) and object tags for a folder of photographs,
    written as the `<stem>.json` sidecars prepare-data reads. Models are local folders."""

    captioner: str = ""  # an image-text-to-text model folder (BLIP, LLaVA, Qwen2-VL, ...): required
    # per level; the image is the HR crop at HR/4, HR/2 and HR, as the paper captions GT/4, GT/2, GT.
    # Chat models (a chat template in the processor) get these as instructions; others (BLIP)
    # as the caption's opening words: give BLIP prefixes such as "a photograph of"
    prompts: Dict[str, str] = field(default_factory=lambda: {
        "x4": "Describe the main subject of this image in a few words.",
        "x2": "Describe this image in one sentence: its main objects and the scene.",
        "x1": "Describe this image in detail: the objects, their colours and textures, and the background.",
    })
    max_new_tokens: int = 60
    min_new_tokens: int = 1
    # a zero-shot object detector folder (OWLv2 / OWL-ViT), run on the LR image prepare-data will
    # make (same seed); empty = tags are the nouns of the coarsest (x4) caption
    detector: str = ""
    vocabulary: List[str] = field(default_factory=lambda: [
        "person", "face", "animal", "cat", "dog", "bird", "horse", "flower", "plant", "tree", "grass", "sky",
        "cloud", "water", "mountain", "rock", "sand", "building", "house", "window", "door", "road", "car",
        "bicycle", "boat", "food", "cup", "table", "chair", "book", "text", "sign", "clothing", "hat",
    ])
    score_threshold: float = 0.3  # detector score for a vocabulary word to become a tag
    max_tags: int = 8
    batch_size: int = 4
    device: str = "cpu"
