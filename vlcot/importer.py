"""`realsr-r1 import-policy`: a released Lumina-mGPT / PURE checkpoint -> this project's HF layout.

What a released folder (written by Lumina's `xllmx` solver) holds, and what is changed
(../shared/REAL-CHECKPOINT.md has the upstream facts):

- architecture `ChameleonXLLMXForConditionalGeneration` -> the stock
  `ChameleonForConditionalGeneration`, which transformers and vLLM resolve;
- q/k norms saved as `[1, head_dim]` -> `[heads, head_dim]` as transformers' Chameleon holds
  them (the same values on every head, as Lumina repeats them at forward time);
- no `model.vqmodel.*` weights (xllmx deletes Chameleon's VQGAN before training) -> a minimal,
  frozen VQGAN config and its seeded weights, so both engines find every parameter they build
  (the policy reads LlamaGen codes as tokens and never runs that VQGAN);
- the image-code ids read from the tokenizer file's `IMGIMG...Z` names (PURE: 16,384 codes on
  ids 4-8195 and 65536-73727) into `vocabulary_map`, and the span tokens found by name
  (`<racm3:break>`, `<eoss>`, `<reserved08799>`, `<reserved08800>` + n) into
  `realsr_token_layout`;
- `realsr_conversation: lumina`, so the released conversation format is used by default;
- `max_position_embeddings` carried over as it is (the length the model was trained to).

Everything is checked before anything is written (config, tokenizer, every shard's header
against the shapes the converted model needs); the output is assembled in a temporary folder
beside `out` and renamed into place at the end, so a refusal leaves nothing behind. Tensors
are streamed one at a time into output shards (`vlcot.shards.ShardWriter`): memory stays at
one output shard plus one tensor, whatever the model's size.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import safe_open

from vlcot.config import STOCK_ARCHITECTURE
from vlcot.conversation import CHECKPOINT_KEY
from vlcot.errors import UserError, output_folder
from vlcot.layout import parse_image_code_name
from vlcot.policy import LAYOUT_KEY, MINIMAL_CHAMELEON_VQ, UnmaskedChameleonForConditionalGeneration
from vlcot.shards import ShardWriter, shard_files

RELEASED_ARCHITECTURES = ("ChameleonXLLMXForConditionalGeneration", "ChameleonForConditionalGeneration")
TOKENIZER_FILES = ("text_tokenizer.json", "tokenizer.json")
SPAN_TOKENS = {"image_start": "<racm3:break>", "image_end": "<eoss>", "row_newline": "<reserved08799>",
               "grid_base": "<reserved08800>"}
END_OF_TURN = "<reserved08706>"
VQMODEL_PREFIX = "model.vqmodel."
_NORMS = (".self_attn.q_norm.", ".self_attn.k_norm.")


class ImportRefused(UserError):
    """The source folder is not a checkpoint this importer recognises; nothing was written
    (the message says so first)."""

    def __init__(self, msg: str):
        super().__init__(f"refused, nothing written: {msg}")


@dataclass
class ImportReport:
    src: str
    out: str
    changes: List[str] = field(default_factory=list)
    tensors: int = 0
    bytes: int = 0
    shards: List[str] = field(default_factory=list)
    seconds: float = 0.0
    check_seconds: float = 0.0  # the checks before anything is written (config, tokenizer, every shard header)
    peak_shard_bytes: int = 0

    def render(self) -> str:
        lines = [f"import-policy: {self.src} -> {self.out}"]
        lines += [f"  - {c}" for c in self.changes]
        lines.append(f"  {self.tensors} tensors, {self.bytes / 1e9:.3f} GB in {len(self.shards)} shard(s), "
                     f"{self.seconds:.1f}s ({self.bytes / 1e9 / max(self.seconds, 1e-9):.2f} GB/s)")
        return "\n".join(lines)


def _refuse(msg: str):
    raise ImportRefused(msg)


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        _refuse(f"{path} not found: {what}")
    try:
        value = json.loads(path.read_text())
    except ValueError as exc:  # malformed JSON, or not UTF-8 text
        _refuse(f"{path} is not valid JSON ({str(exc).splitlines()[0]})")
    if not isinstance(value, dict):
        _refuse(f"{path} holds a JSON {type(value).__name__}, not an object: {what}")
    return value


def tokenizer_vocabulary(tok: dict, path: Path) -> Dict[str, int]:
    """name -> id from a `tokenizers` JSON file: the model's vocab plus its added tokens."""
    vocab = (tok.get("model") or {}).get("vocab")
    if not isinstance(vocab, dict):
        _refuse(f"{path} has no model.vocab: not a tokenizers JSON file")
    out = {str(k): int(v) for k, v in vocab.items()}
    for added in tok.get("added_tokens") or []:
        out[str(added["content"])] = int(added["id"])
    return out


@dataclass
class _Plan:
    raw: dict
    vocab: Dict[str, int]
    token_file: Path
    layout: Dict[str, int]
    shards: List[Path]
    keys: List[Tuple[Path, str]]  # (shard, tensor name) of every tensor to carry over
    repeat_norms: int
    dropped_vq: int
    changes: List[str]


def _plan(src: Path, codebook_size: int, max_grid: int, patch_px: int, tokenizer_file: Optional[Path]) -> _Plan:
    from transformers import ChameleonConfig

    if not src.is_dir():
        _refuse(f"--src {src} is not a folder")
    raw = _read_json(src / "config.json", "a released checkpoint folder holds config.json, safetensors shards and "
                     "its tokenizer file")
    if raw.get("model_type") != "chameleon":
        _refuse(f"{src / 'config.json'}: model_type {raw.get('model_type')!r}, expected 'chameleon' "
                "(Lumina-mGPT / PURE)")
    arch = (raw.get("architectures") or [None])[0]
    if arch not in RELEASED_ARCHITECTURES:
        _refuse(f"{src / 'config.json'}: architecture {arch!r} not in {list(RELEASED_ARCHITECTURES)}")
    changes = [f"architectures: {arch} -> {STOCK_ARCHITECTURE}"] if arch != STOCK_ARCHITECTURE else []

    # ---- tokenizer: image codes and span tokens by name ---------------------------------------
    candidates = [tokenizer_file] if tokenizer_file else [src / n for n in TOKENIZER_FILES]
    token_file = next((p for p in candidates if p.is_file()), None)
    if token_file is None:
        _refuse(f"no tokenizer file: looked for {', '.join(str(p) for p in candidates)}")
    vocab = tokenizer_vocabulary(_read_json(token_file, "tokenizer"), token_file)
    codes: Dict[int, int] = {}
    for name, tid in vocab.items():
        code = parse_image_code_name(name)
        if code is not None:
            codes[code] = tid
    if len(codes) != codebook_size or set(codes) != set(range(codebook_size)):
        _refuse(f"{token_file} names {len(codes)} image codes (IMGIMG...Z), but the VQ codebook has {codebook_size} "
                f"(vq.codebook_size); PURE's tokenizer names 16,384")
    vocab_size = int(raw.get("vocab_size", 0))
    top = max(vocab.values())
    if top >= vocab_size:
        _refuse(f"{token_file} uses token id {top}, but {src / 'config.json'} has vocab_size {vocab_size}")
    layout: Dict[str, int] = {}
    for key, name in SPAN_TOKENS.items():
        if name not in vocab:
            _refuse(f"{token_file} has no {name} token (the image span's {key})")
        layout[key] = vocab[name]
    for n in range(1, max_grid + 1):
        name = f"<reserved{8800 + n:05d}>"
        if vocab.get(name) != layout["grid_base"] + n:
            _refuse(f"{token_file}: grid token {name} should be id {layout['grid_base'] + n}, found {vocab.get(name)}")
    if END_OF_TURN not in vocab:
        _refuse(f"{token_file} has no {END_OF_TURN} token (the released turn separator and end token)")
    layout.update(max_grid=max_grid, patch_px=patch_px, downsample=8, codebook_size=codebook_size)
    ranges = _id_ranges(sorted(codes.values()))
    changes.append(f"image codes: {codebook_size} read from {token_file.name} on ids "
                   + ", ".join(f"{a}-{b - 1}" for a, b in ranges) + " -> config.json vocabulary_map")
    changes.append("span tokens by name: " + ", ".join(f"{k} {v}" for k, v in layout.items() if k in SPAN_TOKENS)
                   + " -> config.json realsr_token_layout")

    # ---- the converted config and the shapes it needs -------------------------------------------
    new_raw = dict(raw)
    new_raw.update(architectures=[STOCK_ARCHITECTURE], vocabulary_map=vocab, vq_config=MINIMAL_CHAMELEON_VQ)
    new_raw[LAYOUT_KEY] = layout
    new_raw[CHECKPOINT_KEY] = "lumina"
    config = ChameleonConfig(**{k: v for k, v in new_raw.items() if k not in ("architectures",)})
    with torch.device("meta"):
        meta_model = UnmaskedChameleonForConditionalGeneration(config)
    need = {k: tuple(v.shape) for k, v in meta_model.state_dict().items()}
    del meta_model

    shards = shard_files(src)  # a shard the index names but the folder lacks is refused here
    keys: List[Tuple[Path, str]] = []
    seen: Dict[str, Path] = {}
    repeat_norms = dropped_vq = 0
    for shard in shards:
        try:
            with safe_open(str(shard), "pt") as f:
                entries = [(k, tuple(f.get_slice(k).get_shape())) for k in f.keys()]
        except Exception as exc:  # truncated or not safetensors
            _refuse(f"{shard} cannot be read as safetensors ({type(exc).__name__}: {exc})")
        for name, shape in entries:
            if name in seen:
                _refuse(f"tensor {name} is in both {seen[name].name} and {shard.name}")
            seen[name] = shard
            if name.startswith(VQMODEL_PREFIX):
                dropped_vq += 1
                continue
            if name not in need:
                _refuse(f"{shard.name}: tensor {name} is not part of a Chameleon model of this config")
            want = need[name]
            if shape != want:
                if any(n in name for n in _NORMS) and len(shape) == 2 and shape[0] == 1 and shape[1] == want[1]:
                    repeat_norms += 1
                else:
                    _refuse(f"{shard.name}: tensor {name} has shape {list(shape)}, the model needs {list(want)}")
            keys.append((shard, name))
    missing = [k for k in need if not k.startswith(VQMODEL_PREFIX) and k not in seen]
    if missing:
        _refuse(f"{len(missing)} weights the model needs are in no shard, first {missing[0]}")
    if repeat_norms:
        changes.append(f"q/k norms: {repeat_norms} tensors [1, head_dim] -> [heads, head_dim] (repeated over heads)")
    vq_note = f"{dropped_vq} released vqmodel tensors dropped and r" if dropped_vq else "no vqmodel weights (as xllmx saves); r"
    changes.append(vq_note + "eplaced by a minimal frozen VQGAN (never run: the policy reads LlamaGen codes)")
    mpe = raw.get("max_position_embeddings")
    changes.append(f"max_position_embeddings {mpe} kept" if mpe else "max_position_embeddings absent: transformers' default")
    changes.append("conversation preset: lumina (realsr_conversation)")
    return _Plan(new_raw, vocab, token_file, layout, shards, keys, repeat_norms, dropped_vq, changes)


def _id_ranges(ids: List[int]) -> List[Tuple[int, int]]:
    out: List[Tuple[int, int]] = []
    for t in ids:
        if out and out[-1][1] == t:
            out[-1] = (out[-1][0], t + 1)
        else:
            out.append((t, t + 1))
    return out


def _minimal_vq_weights(config, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    with torch.random.fork_rng():
        torch.manual_seed(0)
        vq = ChameleonVQVAE(config.vq_config)
    return {VQMODEL_PREFIX + k: v.to(dtype) if v.is_floating_point() else v for k, v in vq.state_dict().items()}


def _write_tokenizer(plan: _Plan, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    by_id = {v: k for k, v in plan.vocab.items()}
    special = {}
    for key in ("bos", "eos", "pad"):
        tid = plan.raw.get(f"{key}_token_id")
        if tid is not None and tid in by_id:
            special[f"{key}_token"] = by_id[tid]
    if "bos_token" not in special:
        _refuse(f"{plan.token_file}: config.json bos_token_id {plan.raw.get('bos_token_id')} names no token")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(plan.token_file), clean_up_tokenization_spaces=False, **special)
    tok.save_pretrained(out)


def import_policy(src: str | Path, out: str | Path, *, codebook_size: int = 16384, max_grid: int = 64,
                  patch_px: int = 32, tokenizer_file: str | Path | None = None,
                  max_shard_bytes: int = 2 << 30) -> ImportReport:
    """Convert `src` into `out` (which must not exist or be empty). Raises ImportRefused (a
    ValueError) or FileNotFoundError naming what is wrong, having written nothing."""
    from transformers import ChameleonConfig

    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        _refuse(f"--out {out} exists and is not empty" if out.is_dir() else f"--out {out} is a file: give a new folder")
    output_folder(out, "--out")  # not under a file, writable: known before the checks read every shard
    try:
        plan = _plan(src, codebook_size, max_grid, patch_px, Path(tokenizer_file) if tokenizer_file else None)
    except ImportRefused:
        raise
    except (FileNotFoundError, UserError) as exc:  # a shard the index names is missing, a damaged index
        raise ImportRefused(str(exc)) from None
    checked = time.perf_counter()
    tmp = out.parent / f".{out.name}.importing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        writer = ShardWriter(tmp, max_shard_bytes=max_shard_bytes)
        dtype = None
        by_shard: Dict[Path, List[str]] = {}
        for shard, name in plan.keys:
            by_shard.setdefault(shard, []).append(name)
        for shard in plan.shards:
            with safe_open(str(shard), "pt") as f:
                for name in by_shard.get(shard, []):
                    t = f.get_tensor(name)
                    if any(n in name for n in _NORMS) and t.dim() == 2 and t.shape[0] == 1:
                        heads = plan.raw["num_key_value_heads" if ".k_norm." in name else "num_attention_heads"]
                        t = t.expand(int(heads), -1).clone()
                    dtype = dtype or (t.dtype if t.is_floating_point() else None)
                    writer.add(name, t)
        config = ChameleonConfig(**{k: v for k, v in plan.raw.items() if k != "architectures"})
        writer.add_all(_minimal_vq_weights(config, dtype or torch.float32).items())
        shards = writer.close()
        (tmp / "config.json").write_text(json.dumps(plan.raw, indent=2, sort_keys=True) + "\n")
        _write_tokenizer(plan, tmp)
        if out.exists():
            out.rmdir()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ImportReport(src=str(src), out=str(out), changes=plan.changes, tensors=len(plan.keys),
                        bytes=writer.total_bytes, shards=shards, seconds=time.perf_counter() - t0,
                        check_seconds=checked - t0,
                        peak_shard_bytes=writer.peak_pending_bytes)
