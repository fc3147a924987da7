"""Writing an HF-layout safetensors checkpoint from a stream of (name, tensor), shard by shard.

`ShardWriter` keeps at most one shard's tensors in memory: whoever produces the tensors
(the learner gathering ZeRO-3 partitions, `import-policy` converting a released folder) never
needs the whole model at once. Shards are named as transformers names them
(`model-00001-of-00003.safetensors` + `model.safetensors.index.json`, or a single
`model.safetensors`), so both transformers and vLLM load the folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from safetensors.torch import save_file

from vlcot.errors import BadPath, UserError, read_json

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class ShardWriter:
    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 2 << 30, dtype: Optional[torch.dtype] = None):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.dtype = dtype  # cast floating tensors to this on write (None = as given)
        self._pending: Dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: List[Tuple[str, List[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0
        self.peak_pending_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._written):
            raise ValueError(f"tensor {name!r} written twice")
        t = tensor.detach().cpu()
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = t
        self._pending_bytes += nbytes
        self.peak_pending_bytes = max(self.peak_pending_bytes, self._pending_bytes)
        self.total_bytes += nbytes

    def add_all(self, named: Iterable[Tuple[str, torch.Tensor]]) -> None:
        for name, t in named:
            self.add(name, t)

    def _flush(self) -> None:
        if not self._pending:
            return
        tmp = f".shard-{len(self._written):05d}.safetensors"
        save_file(self._pending, str(self.out / tmp), metadata={"format": "pt"})
        self._written.append((tmp, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> List[str]:
        """Write the last shard, give the shards their final names and write the index.
        Returns the shard file names."""
        self._flush()
        n = len(self._written)
        if n == 0:
            raise ValueError("no tensors were written")
        if n == 1:
            (self.out / self._written[0][0]).rename(self.out / SINGLE_NAME)
            return [SINGLE_NAME]
        weight_map: Dict[str, str] = {}
        names = []
        for i, (tmp, tensors) in enumerate(self._written, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            (self.out / tmp).rename(self.out / final)
            names.append(final)
            weight_map.update({t: final for t in tensors})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return names


def shard_files(folder: str | Path) -> List[Path]:
    """The safetensors files of an HF-layout folder, in index order; a shard the index names
    but the folder lacks is a FileNotFoundError naming it."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index, "a safetensors index (weight_map: tensor -> shard file)")
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index} has no weight_map: the folder's safetensors index is damaged")
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise BadPath(f"{index} names shard {missing[0]}, which is not in {folder}"
                          f" ({len(missing)} of {len(files)} shards missing)")
        return [folder / f for f in files]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BadPath(f"no .safetensors weights in {folder}")
    return files


def write_policy_folder(out: str | Path, named: Iterable[Tuple[str, torch.Tensor]], source_dir: str | Path,
                        dtype: Optional[torch.dtype] = None, max_shard_bytes: int = 2 << 30, write: bool = True) -> None:
    """A policy folder with the weights from `named` (streamed into shards) and every other
    file (config, tokenizer) copied from `source_dir`; config.json records the written dtype.
    With `write` false the stream is only consumed (the other ranks of a collective gather)."""
    if not write:
        for _ in named:
            pass
        return
    out, source_dir = Path(out), Path(source_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.safetensors")) + [out / INDEX_NAME]:
        old.unlink(missing_ok=True)
    writer = ShardWriter(out, max_shard_bytes=max_shard_bytes, dtype=dtype)
    writer.add_all(named)
    writer.close()
    same = out.resolve() == source_dir.resolve()
    for f in source_dir.iterdir():
        if not same and f.is_file() and f.suffix != ".safetensors" and f.name not in (INDEX_NAME, "config.json"):
            shutil.copy2(f, out / f.name)
    raw = json.loads((source_dir / "config.json").read_text())
    if dtype is not None:
        raw["dtype"] = str(dtype).replace("torch.", "")
        raw.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
