"""Configuration: dataclass defaults -> OmegaConf structured config -> yaml -> CLI dotlist
overrides -> validated dataclass objects.

An unknown key or a value of the wrong type raises `ConfigError` naming the full key, before
anything is started. Then `validate` gathers the problems of every package (each package's
`problems()`: vlcot/config_problems.py, rollout/, learner/, rewards/, evaluation/ config,
cluster/tracking_config.py) and of the checks here that relate two roles' settings, and raises one
`ConfigError` listing them all, one line per full key.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cluster.tracking_config import TrackingConfig, tracking_problems
from evaluation.config import EvalConfig, InferConfig
from evaluation.config import problems as evaluation_problems
from learner.advantages import ADVANTAGE_ESTIMATORS
from learner.config import LearnerConfig
from learner.config import problems as learner_problems
from learner.schedule import problems as schedule_problems
from rewards.config import RewardsConfig
from rewards.config import problems as reward_problems
from rollout import kv_budget as kb
from rollout.config import RolloutConfig
from rollout.config import problems as rollout_problems
from vlcot.config import (AnnotateConfig, DataConfig, DegradationConfig, ImageConfig, PolicyConfig, VQConfig,
                          VQTrainConfig, policy_folder_problem)
from vlcot.config_problems import problems as vlcot_problems
from vlcot.conversation import CHECKPOINT_KEY, resolve_conversation
from vlcot.errors import UserError, one_line

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny-cpu.yaml"


@dataclass
class EnvConfig:
    """Python environments of the roles (Ray runtime_env `py_executable`).

    iqa_python: interpreter for roles that need pyiqa (reward and eval workers). "auto" =
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
    # from and the one it ends with, side by side in <run_dir>/heldout.md (training/heldout_eval.py)
    heldout_eval: bool = True


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
    """A configuration problem, raised before any work starts. From `validate`: every problem of
    the config at once (`problems`, (full key, message) pairs), one line each."""

    problems: Tuple[Tuple[str, str], ...] = ()

    @classmethod
    def of(cls, problems: Sequence[Tuple[str, str]]) -> "ConfigError":
        lines = [f"config key {key!r}: {one_line(msg)}" for key, msg in problems]
        head = [] if len(lines) == 1 else [f"{len(lines)} config problems:"]
        err = cls("\n  ".join(head + lines))
        err.problems = tuple(problems)
        return err

    def lines(self) -> List[str]:
        return [line.strip() for line in str(self).splitlines()] if self.problems else super().lines()


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


# ---- semantic validation: each package's problems, then the checks that relate two roles --------------
def _checkpoint_problems(cfg: Config) -> List[Tuple[str, str]]:
    """rollout.max_model_len against the local policy folder's position limit (the folder
    itself: vlcot's problems)."""
    path = Path(cfg.policy.checkpoint)
    if not cfg.policy.checkpoint or policy_folder_problem(path, files=False):
        return []
    limit = int(json.loads((path / "config.json").read_text()).get("max_position_embeddings") or 0)
    if limit and cfg.rollout.max_model_len > limit:
        return [("rollout.max_model_len", f"{cfg.rollout.max_model_len} exceeds the policy's max_position_embeddings "
                 f"{limit} ({path / 'config.json'}): set it to at most {limit}")]
    return []


def _gpu_sharing_problems(cfg: Config) -> List[Tuple[str, str]]:
    """NCCL refuses two ranks on one GPU ("Duplicate GPU detected"): a fractional GPU request
    lets Ray put two ranks of one NCCL group on one device: two learner ranks, or two members
    of the network weight group (learner rank 0 and rollout workers)."""
    r, lr, out = cfg.rollout, cfg.learner, []
    if 0 < lr.num_gpus < 1 and lr.num_workers > 1:
        out.append(("learner.num_gpus", f"{lr.num_gpus} lets {lr.num_workers} learner ranks share a GPU, which their "
                    "NCCL group refuses: use 1 (one GPU per rank)"))
    if 0 < r.gpus_per_worker < 1 and cfg.trainer.weight_sync == "network":
        out.append(("rollout.gpus_per_worker", f"{r.gpus_per_worker} lets a rollout worker share a GPU with another "
                    "member of the NCCL weight group (learner rank 0 or a worker), which NCCL refuses: use whole GPUs "
                    "(1), or trainer.weight_sync=filesystem (no process group); a same-GPU (CUDA IPC) path is not "
                    "implemented"))
    if r.engine == "vllm" and r.tensor_parallel_size > 1:
        out.append(("rollout.tensor_parallel_size", f"{r.tensor_parallel_size}: weight updates pass tensors to an "
                    "in-process vLLM engine, which tensor parallelism moves into other processes; use 1 and scale "
                    "with rollout.num_workers"))
    return out


def _cross_role_problems(cfg: Config) -> List[Tuple[str, str]]:
    """Checks that relate two packages' settings; each skips what a package's own problems name."""
    out = _checkpoint_problems(cfg) + _gpu_sharing_problems(cfg)
    name, size = cfg.learner.grpo.advantage, cfg.rollout.group_size
    if name in ADVANTAGE_ESTIMATORS and size < ADVANTAGE_ESTIMATORS.get(name).min_group_size:
        out.append(("rollout.group_size", f"{size}: advantage estimator {name!r} compares the samples of one prompt "
                    f"and needs >= {ADVANTAGE_ESTIMATORS.get(name).min_group_size} (with fewer, every advantage is "
                    "exactly 0 and nothing is learned)"))
    if cfg.infer.tile_overlap >= cfg.image.lr_size:
        out.append(("infer.tile_overlap", f"must be smaller than the tile (image.lr_size {cfg.image.lr_size}), got "
                    f"{cfg.infer.tile_overlap}"))
    for role, res in (("learner", cfg.learner.resources), ("rollout", cfg.rollout.resources),
                      ("rewards", cfg.rewards.resources)):
        if any(k in ("CPU", "GPU", "memory") or v <= 0 for k, v in res.items()):
            out.append((f"{role}.resources", f"{dict(res)}: custom resources only, each > 0 (CPUs and GPUs have "
                        "their own keys)"))
    samples, ranks = cfg.trainer.prompts_per_step * cfg.rollout.group_size, cfg.learner.num_workers
    if ranks >= 1 and samples % ranks:
        out.append(("trainer.prompts_per_step", f"prompts_per_step x rollout.group_size = {samples} samples must "
                    f"divide over learner.num_workers {ranks}"))
    return out


def _trainer_problems(t: TrainerConfig, envs: EnvConfig) -> List[Tuple[str, str]]:
    """The driver loop's own settings (`trainer`) and the roles' interpreters (`envs`)."""
    from cluster.weight_sync import WEIGHT_SYNCS  # local: Ray; a config is read and checked without it

    out = [(f"trainer.{key}", f"{getattr(t, key)!r} not in {list(allowed)}") for key, allowed in (
        ("prompt_order", ("shuffle", "spread")), ("mode", ("sync", "async")),
        ("weight_sync", WEIGHT_SYNCS.names()), ("placement", ("auto", "enabled", "disabled")))
        if getattr(t, key) not in allowed]
    if t.weight_sync_timeout_s <= 0 or t.actor_start_timeout_s <= 0:
        out.append(("trainer", "weight_sync_timeout_s and actor_start_timeout_s must be > 0 seconds"))
    if t.steps < 0 or t.prompts_per_step < 1 or t.checkpoint_every < 1 or t.max_staleness < 1:
        out.append(("trainer", "steps >= 0, prompts_per_step >= 1, checkpoint_every >= 1 and max_staleness >= 1 "
                    "are required"))
    if envs.iqa_python != "auto" and not Path(envs.iqa_python).is_file():
        out.append(("envs.iqa_python", f"not an interpreter path: {envs.iqa_python} (or use 'auto')"))
    return out


def problems(cfg: Config) -> List[Tuple[str, str]]:
    """Every problem of `cfg` as (full key, message): each package's own, then the cross-role checks."""
    return (vlcot_problems(image=cfg.image, vq=cfg.vq, policy=cfg.policy, degradation=cfg.degradation,
                           data=cfg.data, annotate=cfg.annotate, vq_train=cfg.vq_train)
            + reward_problems(cfg.rewards) + learner_problems(cfg.learner) + rollout_problems(cfg.rollout)
            + schedule_problems(cfg.learner.schedule, cfg.trainer.steps) + evaluation_problems(cfg.infer, cfg.eval)
            + tracking_problems(cfg.tracking) + _trainer_problems(cfg.trainer, cfg.envs) + _cross_role_problems(cfg))


class KVBudgetWarning(UserWarning):
    """A rollout worker's KV cache cannot hold its peak demand: the run works, slower."""


def rollout_kv_estimate(cfg: Config):
    """(WorkerKV, KVShape, capacity note) of one vLLM rollout worker at its peak (rollout/kv_budget.py):
    the shape from the policy's config.json, else Chameleon-7B as documented when a checkpoint is
    named (its config.json states no sizes), else the configured tiny model; capacity from
    rollout.kv_cache_blocks, else the GPU share (gpu_memory_utilization of an assumed card), else
    the CPU backend's kv_cache_gb. None for the HF engine (no paged cache)."""
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
        warnings.warn(kb.worker_kv_warning(*found), KVBudgetWarning, stacklevel=3)


def validate(cfg: Config) -> None:
    """Refuse `cfg` with one ConfigError that names every problem (one line each); a config that
    works, but slower than it could, gets a warning instead."""
    found = problems(cfg)
    if found:
        raise ConfigError.of(found)
    _warn_kv_budget(cfg)  # a warning, not an error: the run still works
