"""Configuration: dataclass defaults -> OmegaConf structured config -> yaml -> CLI dotlist
overrides -> validated dataclass objects.

Every problem (unknown key, wrong type, bad value) raises `ConfigError` naming the full
key and what is allowed, before anything is started.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cluster.tracking import problems as tracking_problems
from evaluation.config import EvalConfig, InferConfig
from evaluation.config import problems as evaluation_problems
from learner.advantages import ADVANTAGE_ESTIMATORS
from learner.config import LearnerConfig
from learner.config import problems as learner_problems
from learner.schedule import problems as schedule_problems
from rewards.config import RewardsConfig
from rollout.config import RolloutConfig
from rollout.config import problems as rollout_problems
from rewards.config import problems as reward_problems
from vlcot.config import (LABEL_MEASURES, AnnotateConfig, DataConfig, DegradationConfig, ImageConfig, OrderConfig,
                          PolicyConfig, VQConfig, VQTrainConfig, annotate_problems, policy_folder_problem,
                          resolve_checkpoint, vq_train_problems)
from vlcot.conversation import CHECKPOINT_KEY, conversation_problems, resolve_conversation
from vlcot.errors import UserError
from vlcot.kernels import KERNEL_TYPES

REPO_ROOT = Path(__file__).resolve().parents[1]
POLICY_INITS = ("tiny", "released-layout")  # policy.init: how an empty policy.checkpoint is built
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny-cpu.yaml"
DTYPES = ("float32", "bfloat16", "float16")
VLLM_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)  # vLLM CPU attention; GPU kernels cover these too


@dataclass
class EnvConfig:
    """Python environments of the roles (Ray runtime_env `py_executable`).

    iqa_python: interpreter for roles that need pyiqa (reward and eval actors). "auto" =
    `<repo>/.venv-iqa/bin/python` when it exists (CPU install: two environments), else the
    driver's own interpreter (GPU install: one environment). Or an absolute path.
    """

    iqa_python: str = "auto"


@dataclass
class TrainerConfig:
    """The GRPO driver loop (`realsr-r1 train`)."""

    steps: int = 100
    prompts_per_step: int = 8  # B; each gets rollout.group_size samples
    # shuffle: each epoch a random order | spread: each step's prompts from as many different
    # source images as it can (round-robin over the sources; cluster/run_state.DataCursor)
    prompt_order: str = "shuffle"
    mode: str = "sync"  # sync (on-policy) | async (one-step-off: rollout of t+1 overlaps training of t)
    max_staleness: int = 1  # async: samples more policy versions behind are dropped (counted)
    sft: bool = True  # cold-start SFT (learner.sft) before GRPO; skipped on resume
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    log_images_every: int = 5
    placement: str = "auto"  # one Ray placement group for all actors: auto (when GPUs are asked for) | enabled | disabled
    weight_sync: str = "network"  # how weights reach the rollout workers: network | filesystem (cluster/weight_sync.py)
    weight_sync_dir: str = ""  # filesystem: a folder every node sees; "" = <run_dir>/weight_sync
    # network: how long a member waits for the group to form or for a broadcast; in async mode a
    # worker's receive queues behind a whole generation, so size it above the longest one
    weight_sync_timeout_s: float = 1800.0
    # network sync on CPU: rollout workers on learner rank 0's node read the weights from one
    # /dev/shm file (written in the same parameter walk) instead of the network group
    weight_sync_shm: bool = True
    actor_start_timeout_s: float = 600.0  # an actor not up by then: the error names what it asked for
    # greedy rewards on the held-out prompts (data.heldout_per_image) with the policy GRPO starts
    # from and the one it ends with, side by side in <run_dir>/heldout.md (cluster/heldout_eval.py)
    heldout_eval: bool = True


@dataclass
class TrackingConfig:
    """MLflow (cluster/tracking.py; docs/cluster.md "Tracking")."""

    uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/mlflow.db; a server: http://HOST:PORT
    experiment: str = "realsr-r1"
    run_name: str = ""
    # a store that cannot be reached at start-up refuses the run (before any actor starts);
    # false: a warning, and the run trains untracked
    required: bool = True
    buffer_s: float = 900.0  # metrics/artifacts a server could not take wait this long, then are dropped (counted)
    buffer_values: int = 200000  # and at most this many metric values wait (the oldest are dropped first)
    timeout_s: float = 10.0  # per request to a tracking server (one retry); MLFLOW_HTTP_REQUEST_TIMEOUT wins when set
    system_metrics: bool = True  # CPU, memory, disk, network, GPU (with pynvml) as MLflow's log_system_metrics
    system_metrics_every_s: float = 10.0


@dataclass
class Config:
    seed: int = 0
    run_dir: str = "runs/default"
    image: ImageConfig = field(default_factory=ImageConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    envs: EnvConfig = field(default_factory=EnvConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    vq_train: VQTrainConfig = field(default_factory=VQTrainConfig)


class ConfigError(UserError):
    """A configuration problem, raised before any work starts."""


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = (), default: bool = True) -> Config:
    """Merge dataclass defaults, the yaml at `path` (or the tiny CPU default when `path`
    is None and `default` is true) and `key=value` overrides; validate; return a Config.
    A yaml may start from another (`base: other.yaml`, relative to its own folder) and
    change only what differs."""
    if path is None and default:
        path = DEFAULT_CONFIG
    merged = OmegaConf.structured(Config)
    try:
        if path is not None:
            for layer in _yaml_layers(Path(path)):
                merged = OmegaConf.merge(merged, layer)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not key=value")
        merged = OmegaConf.merge(merged, _dotlist(overrides))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(exc).splitlines()[0]
        if "Incompatible value 'None'" in msg:  # `key=` on the command line is null, not ""
            msg += f"; an empty string is written {key}=''"
        raise ConfigError(f"config key {key!r}: {msg}") from None
    validate(cfg)
    return cfg


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML parser error as one phrase: what and where (line and column counted from 1)."""
    what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{what} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else what


def _dotlist(overrides: Sequence[str]):
    """key=value overrides as a config; a value that is not YAML names its override."""
    for item in overrides:
        try:
            OmegaConf.from_dotlist([item])
        except yaml.YAMLError as exc:
            what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({what}): write a list as [1, 2] "
                              "and put a string holding [ { : or # in quotes") from None
    return OmegaConf.from_dotlist(list(overrides))


def _yaml_layers(path: Path) -> list:
    """The yaml at `path` after the chain of `base:` files it starts from (base first)."""
    layers, seen = [], []
    while path is not None:
        of = f" (the base of {seen[-1]})" if seen else ""
        if path.is_dir():
            raise ConfigError(f"config file {path}{of} is a folder: give a yaml file, e.g. {DEFAULT_CONFIG}")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}{of}: give an existing yaml file, e.g. {DEFAULT_CONFIG}")
        if path.resolve() in seen:
            raise ConfigError(f"config files name each other as base: {' -> '.join(map(str, seen + [path]))}")
        seen.append(path.resolve())
        try:
            layer = OmegaConf.load(path)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}{of} is not valid YAML: {_yaml_problem(exc)}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path}{of} is not a text (UTF-8) file: give a yaml file") from None
        except OSError as exc:
            raise ConfigError(f"config file {path}{of} cannot be read: {exc.strerror or exc}") from None
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"config file {path}{of} holds a {type(layer).__name__.replace('Config', '').lower()}, "
                              "not a mapping of config keys (`section: {key: value}`, as in configs/*.yaml)")
        base = layer.pop("base", None)
        layers.insert(0, layer)
        path = (path.parent / str(base)) if base else None
    return layers


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(cfg: Config) -> dict:
    """{'image.hr_size': 512, ...}: for experiment-tracker params."""
    out: dict = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(OmegaConf.structured(cfg)), "")
    return out


# ---- semantic validation -----------------------------------------------------------------------
def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"config key {key!r}: {msg}")


def _prob(key: str, v: float) -> None:
    if not 0.0 <= v <= 1.0:
        _fail(key, f"must be a probability in [0, 1], got {v}")


def _range(key: str, v: List[float], lo: float = float("-inf")) -> None:
    if len(v) != 2 or v[0] > v[1] or v[0] < lo:
        _fail(key, f"must be [low, high] with {lo} <= low <= high, got {list(v)}")


def _monotone(key: str, v: List[float], increasing: bool) -> None:
    ok = len(v) == 3 and all((a < b) if increasing else (a > b) for a, b in zip(v, v[1:]))
    if not ok:
        order = "increasing" if increasing else "decreasing"
        _fail(key, f"must be 3 strictly {order} edges (none|light|medium|heavy), got {list(v)}")


def _validate_order(prefix: str, o: OrderConfig) -> None:
    b = o.blur
    for name in ("prob", "sinc_prob"):
        _prob(f"{prefix}.blur.{name}", getattr(b, name))
    for name in ("gaussian_noise_prob", "gray_noise_prob", "noise_prob", "jpeg_prob"):
        _prob(f"{prefix}.{name}", getattr(o, name))
    if not b.kernel_sizes or any(k < 3 or k % 2 == 0 for k in b.kernel_sizes):
        _fail(f"{prefix}.blur.kernel_sizes", f"must be odd sizes >= 3, got {list(b.kernel_sizes)}")
    unknown = [t for t in b.kernel_types if t not in KERNEL_TYPES]
    if unknown or not b.kernel_types:
        _fail(f"{prefix}.blur.kernel_types", f"unknown {unknown}; allowed: {list(KERNEL_TYPES)}")
    if len(b.kernel_probs) != len(b.kernel_types) or min(b.kernel_probs) < 0 or sum(b.kernel_probs) <= 0:
        _fail(f"{prefix}.blur.kernel_probs", "must be non-negative, one per kernel type, not all zero")
    _range(f"{prefix}.blur.sigma", b.sigma, lo=1e-3)
    _range(f"{prefix}.blur.betag", b.betag, lo=1e-3)
    _range(f"{prefix}.blur.betap", b.betap, lo=1e-3)
    if len(o.resize_probs) != 3 or min(o.resize_probs) < 0 or sum(o.resize_probs) <= 0:
        _fail(f"{prefix}.resize_probs", "must be 3 non-negative weights (up, down, keep), not all zero")
    _range(f"{prefix}.resize_range", o.resize_range, lo=1e-3)
    if not o.resize_range[0] <= 1.0 <= o.resize_range[1]:
        _fail(f"{prefix}.resize_range", f"must contain 1.0, got {list(o.resize_range)}")
    _range(f"{prefix}.noise_sigma", o.noise_sigma, lo=0.0)
    _range(f"{prefix}.poisson_scale", o.poisson_scale, lo=0.0)
    _range(f"{prefix}.jpeg_quality", o.jpeg_quality, lo=1)
    if o.jpeg_quality[1] > 100:
        _fail(f"{prefix}.jpeg_quality", f"quality must be <= 100, got {list(o.jpeg_quality)}")


def _validate_checkpoint(cfg: Config) -> None:
    """What can be checked against a local policy folder before anything starts."""
    path = Path(cfg.policy.checkpoint)
    if not (path / "config.json").is_file():
        _fail("policy.checkpoint", f"{path} is not an HF-layout directory with config.json")
    why = policy_folder_problem(path, files=False)  # weights and tokenizer: when a command loads it
    if why:
        _fail("policy.checkpoint", why)
    raw = json.loads((path / "config.json").read_text())
    limit = int(raw.get("max_position_embeddings") or 0)
    if limit and cfg.rollout.max_model_len > limit:
        _fail("rollout.max_model_len", f"{cfg.rollout.max_model_len} exceeds the policy's max_position_embeddings "
              f"{limit} ({path / 'config.json'}): set it to at most {limit}")


def _validate_gpu_sharing(cfg: Config) -> None:
    """NCCL refuses two ranks on one GPU ("Duplicate GPU detected"): a fractional GPU request
    lets Ray put two ranks of one NCCL group on one device: two learner ranks, or two members
    of the network weight group (learner rank 0 and rollout workers)."""
    r, lr = cfg.rollout, cfg.learner
    if 0 < lr.num_gpus < 1 and lr.num_workers > 1:
        _fail("learner.num_gpus", f"{lr.num_gpus} lets {lr.num_workers} learner ranks share a GPU, which their NCCL "
              "group refuses: use 1 (one GPU per rank)")
    if 0 < r.gpus_per_worker < 1 and cfg.trainer.weight_sync == "network":
        _fail("rollout.gpus_per_worker", f"{r.gpus_per_worker} lets a rollout worker share a GPU with another member "
              "of the NCCL weight group (learner rank 0 or a worker), which NCCL refuses: use whole GPUs (1), or "
              "trainer.weight_sync=filesystem (no process group); a same-GPU (CUDA IPC) path is not implemented")
    if r.engine == "vllm" and r.tensor_parallel_size > 1:
        _fail("rollout.tensor_parallel_size", f"{r.tensor_parallel_size}: weight updates pass tensors to an in-process "
              "vLLM engine, which tensor parallelism moves into other processes; use 1 and scale with "
              "rollout.num_workers")


class KVBudgetWarning(UserWarning):
    """A rollout worker's KV cache cannot hold its peak demand: the run works, slower."""


def rollout_kv_estimate(cfg: Config):
    """(WorkerKV, KVShape, capacity note) of one vLLM rollout worker at its peak (rollout/kv_budget.py):
    the shape from the policy's config.json, else Chameleon-7B as documented when a checkpoint is
    named (its config.json states no sizes), else the configured tiny model; capacity from
    rollout.kv_cache_blocks, else the GPU share (gpu_memory_utilization of an assumed card), else
    the CPU backend's kv_cache_gb. None for the HF engine (no paged cache)."""
    from rollout import kv_budget as kb

    r, pol = cfg.rollout, cfg.policy
    if r.engine != "vllm":
        return None
    on_gpu = r.gpus_per_worker > 0
    dtype_bytes = kb.DTYPE_BYTES[pol.dtype] if on_gpu else 4  # the CPU engine runs float32
    raw: dict = {}
    if pol.checkpoint:
        try:
            raw = json.loads((Path(pol.checkpoint) / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            raw = {}
        shape = kb.shape_from_hf_config(raw, dtype_bytes, f"{Path(pol.checkpoint) / 'config.json'}") or \
            kb.decoder_shape(**kb.CHAMELEON_7B, dtype_bytes=dtype_bytes,
                             source="Chameleon-7B as documented (the policy's config.json states no sizes)")
    else:
        m = pol.model
        shape = kb.decoder_shape(m.num_hidden_layers, m.hidden_size, m.num_attention_heads, m.num_key_value_heads,
                                 m.intermediate_size, m.text_vocab_size + cfg.vq.codebook_size, dtype_bytes,
                                 "policy.model")
    conv = resolve_conversation(pol.conversation, raw.get(CHECKPOINT_KEY))
    instruction = kb.text_tokens("".join(conv.split_instruction()) + conv.user_prefix + conv.assistant_prefix) + 2
    s = r.sampling
    trace = kb.trace_tokens(cfg.image.hr_size, cfg.image.prompt_size, instruction, s.text_budget, s.max_new_tokens,
                            s.cfg_scale)
    if r.kv_cache_blocks:
        size = kb.VLLM_BLOCK_SIZE["gpu" if on_gpu else "cpu"]
        capacity, note = r.kv_cache_blocks * size, f"rollout.kv_cache_blocks {r.kv_cache_blocks} x {size} tokens"
    elif on_gpu:
        capacity = kb.gpu_kv_capacity_tokens(shape, r.gpu_memory_utilization)
        note = (f"rollout.gpu_memory_utilization {r.gpu_memory_utilization} of an assumed {kb.GPU_MEMORY_GIB:g} GiB "
                f"card, less {shape.weight_bytes / 2**30:.1f} GiB of weights and {kb.GPU_RESERVE_GIB:g} GiB reserve")
    else:
        gib = max(1, int(r.kv_cache_gb))
        capacity, note = gib * 2**30 // shape.bytes_per_token, f"rollout.kv_cache_gb {gib} GiB"
    est = kb.estimate_worker_kv(trace, r.group_size, cfg.trainer.prompts_per_step, r.num_workers, capacity)
    return est, shape, note


def _warn_kv_budget(cfg: Config) -> None:
    found = rollout_kv_estimate(cfg)
    if found is not None and not found[0].fits:
        from rollout.kv_budget import worker_kv_warning

        warnings.warn(worker_kv_warning(*found), KVBudgetWarning, stacklevel=3)


def validate(cfg: Config) -> None:
    im = cfg.image
    for name in ("hr_size", "lr_size", "prompt_size", "patch_px"):
        if getattr(im, name) <= 0:
            _fail(f"image.{name}", f"must be positive, got {getattr(im, name)}")
    if im.patch_px % 8:
        _fail("image.patch_px", f"must be a multiple of the VQ downsample 8, got {im.patch_px}")
    if im.hr_size % (4 * im.patch_px):
        _fail("image.hr_size", f"must be a multiple of 4 x patch_px = {4 * im.patch_px} (the rough image is HR/4), got {im.hr_size}")
    if im.prompt_size % im.patch_px:
        _fail("image.prompt_size", f"must be a multiple of patch_px {im.patch_px}, got {im.prompt_size}")
    if im.hr_size % im.lr_size:
        _fail("image.lr_size", f"must divide hr_size {im.hr_size}, got {im.lr_size}")
    grids = max(im.hr_size, im.prompt_size) // im.patch_px
    if cfg.policy.special_tokens.max_grid < grids:
        _fail("policy.special_tokens.max_grid", f"must be >= {grids} patches for a {max(im.hr_size, im.prompt_size)} px image")

    vq = cfg.vq
    if len(vq.block_out_channels) != 4:
        _fail("vq.block_out_channels", f"needs 4 levels for x8 downsampling, got {list(vq.block_out_channels)}")
    if any(c % vq.norm_num_groups for c in list(vq.block_out_channels) + [vq.z_channels]):
        _fail("vq.norm_num_groups", f"must divide every channel count {list(vq.block_out_channels)} and z {vq.z_channels}")
    if vq.codebook_size < 2 or vq.codebook_dim < 1 or vq.layers_per_block < 1:
        _fail("vq", "codebook_size >= 2, codebook_dim >= 1 and layers_per_block >= 1 are required")
    if vq.checkpoint:
        try:
            vq_path = resolve_checkpoint(vq.checkpoint)
        except ValueError as exc:
            _fail("vq.checkpoint", str(exc))
        if not vq_path.exists():
            _fail("vq.checkpoint", f"no such file or directory: {vq_path}")
    if vq.weights not in ("model", "ema"):
        _fail("vq.weights", f"{vq.weights!r} not in ['model', 'ema']")

    pol = cfg.policy
    if pol.dtype not in DTYPES:
        _fail("policy.dtype", f"{pol.dtype!r} not in {list(DTYPES)}")
    if pol.init not in POLICY_INITS:
        _fail("policy.init", f"{pol.init!r} not in {list(POLICY_INITS)}")
    for key, msg in conversation_problems(pol.conversation):
        _fail(key, msg)
    if pol.checkpoint:
        _validate_checkpoint(cfg)
    m = pol.model
    if m.hidden_size % m.num_attention_heads or m.num_attention_heads % m.num_key_value_heads:
        _fail("policy.model", "hidden_size must divide by num_attention_heads, which must divide by num_key_value_heads")
    head_dim = m.hidden_size // m.num_attention_heads
    if head_dim not in VLLM_HEAD_DIMS:
        _fail("policy.model", f"head_dim = hidden_size / num_attention_heads = {head_dim}; vLLM's attention kernels need one of {list(VLLM_HEAD_DIMS)}")
    if m.text_vocab_size < 300:
        _fail("policy.model.text_vocab_size", f"must be >= 300 (256 bytes + special and tag tokens), got {m.text_vocab_size}")

    d = cfg.degradation
    _validate_order("degradation.first", d.first)
    _validate_order("degradation.second", d.second)
    _prob("degradation.second_order_prob", d.second_order_prob)
    _prob("degradation.final_sinc_prob", d.final_sinc_prob)
    t = d.thresholds
    _monotone("degradation.thresholds.blur_sigma", t.blur_sigma, increasing=True)
    _monotone("degradation.thresholds.noise_std", t.noise_std, increasing=True)
    _monotone("degradation.thresholds.jpeg_quality", t.jpeg_quality, increasing=False)
    if t.measure not in LABEL_MEASURES:
        _fail("degradation.thresholds.measure", f"must be one of {list(LABEL_MEASURES)}, got {t.measure!r}")
    for name in ("lr_blur_rms", "lr_noise_rms", "lr_jpeg_rms"):
        _monotone(f"degradation.thresholds.{name}", getattr(t, name), increasing=True)
    if not 0 <= t.resize_tolerance < 1:
        _fail("degradation.thresholds.resize_tolerance", f"must be in [0, 1), got {t.resize_tolerance}")

    data = cfg.data
    if data.input_dir and not Path(data.input_dir).is_dir():
        _fail("data.input_dir", f"not a folder: {data.input_dir} (give a folder of photographs, or leave it empty "
              "for the built-in set)")
    if data.min_side < 1 or data.max_pixels < 1 or data.variants_per_image < 1:
        _fail("data", "min_side, max_pixels and variants_per_image must be >= 1")
    if cfg.trainer.prompt_order not in ("shuffle", "spread"):
        _fail("trainer.prompt_order", f"{cfg.trainer.prompt_order!r} not in ['shuffle', 'spread']")
    if data.crops_per_image < 0 or data.heldout_per_image < 0:
        _fail("data", f"crops_per_image and heldout_per_image must be >= 0, got {data.crops_per_image} and "
              f"{data.heldout_per_image}")
    if not 0 < data.crop_min_scale <= 1:
        _fail("data.crop_min_scale", f"must be in (0, 1], got {data.crop_min_scale}")
    for key, msg in (reward_problems(cfg.rewards) + learner_problems(cfg.learner) + rollout_problems(cfg.rollout)
                     + schedule_problems(cfg.learner.schedule, cfg.trainer.steps)
                     + evaluation_problems(cfg.infer, cfg.eval) + annotate_problems(cfg.annotate)
                     + vq_train_problems(cfg.vq_train)):
        _fail(key, msg)
    _validate_gpu_sharing(cfg)
    estimator = ADVANTAGE_ESTIMATORS.get(cfg.learner.grpo.advantage)
    if cfg.rollout.group_size < estimator.min_group_size:
        _fail("rollout.group_size", f"{cfg.rollout.group_size}: advantage estimator {cfg.learner.grpo.advantage!r} "
              f"compares the samples of one prompt and needs >= {estimator.min_group_size} (with fewer, every "
              "advantage is exactly 0 and nothing is learned)")
    if cfg.infer.tile_overlap >= im.lr_size:
        _fail("infer.tile_overlap", f"must be smaller than the tile (image.lr_size {im.lr_size}), got {cfg.infer.tile_overlap}")
    t = cfg.trainer
    if t.mode not in ("sync", "async"):
        _fail("trainer.mode", f"{t.mode!r} not in ['sync', 'async']")
    from cluster.weight_sync import WEIGHT_SYNCS

    if t.weight_sync not in WEIGHT_SYNCS:
        _fail("trainer.weight_sync", f"{t.weight_sync!r} not in {WEIGHT_SYNCS.names()}")
    if t.placement not in ("auto", "enabled", "disabled"):
        _fail("trainer.placement", f"{t.placement!r} not in ['auto', 'enabled', 'disabled']")
    if t.weight_sync_timeout_s <= 0 or t.actor_start_timeout_s <= 0:
        _fail("trainer", "weight_sync_timeout_s and actor_start_timeout_s must be > 0 seconds")
    if cfg.rollout.max_workers < 0 or 0 < cfg.rollout.max_workers < cfg.rollout.num_workers:
        _fail("rollout.max_workers", f"{cfg.rollout.max_workers}: 0 (no bound) or at least rollout.num_workers "
              f"{cfg.rollout.num_workers}")
    for role, res in (("learner", cfg.learner.resources), ("rollout", cfg.rollout.resources),
                      ("rewards", cfg.rewards.resources)):
        if any(k in ("CPU", "GPU", "memory") or v <= 0 for k, v in res.items()):
            _fail(f"{role}.resources", f"{dict(res)}: custom resources only, each > 0 (CPUs and GPUs have their own keys)")
    if t.steps < 0 or t.prompts_per_step < 1 or t.checkpoint_every < 1 or t.max_staleness < 1:
        _fail("trainer", "steps >= 0, prompts_per_step >= 1, checkpoint_every >= 1 and max_staleness >= 1 are required")
    if (t.prompts_per_step * cfg.rollout.group_size) % cfg.learner.num_workers:
        _fail("trainer.prompts_per_step", f"prompts_per_step x rollout.group_size = "
              f"{t.prompts_per_step * cfg.rollout.group_size} samples must divide over learner.num_workers "
              f"{cfg.learner.num_workers}")
    for key, msg in tracking_problems(cfg.tracking):
        _fail(key, msg)
    if cfg.envs.iqa_python != "auto" and not Path(cfg.envs.iqa_python).is_file():
        _fail("envs.iqa_python", f"not an interpreter path: {cfg.envs.iqa_python} (or use 'auto')")
    _warn_kv_budget(cfg)  # a warning, not an error: the run still works
