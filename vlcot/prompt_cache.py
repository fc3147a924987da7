"""Prompt codes encoded once: the VQ codes of every LR image at `image.prompt_size`, kept beside
the manifest so that a run's start, its `--resume` and the next run with the same tokenizer read
them instead of encoding every image again (at paper shape a 512-px encode per prompt).

One file per (tokenizer, prompt size): `<manifest dir>/prompt_codes/<digest>.npz` holding each
LR file's path, its size and modification time, and its codes. An entry whose LR file changed
since is encoded again; new images are encoded in batches and added. The digest covers the VQ
tokenizer's weights and configuration and the prompt size, so another tokenizer never reads
codes that belong to a different one.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from vlcot.errors import BadPath
from vlcot.images import open_image

log = logging.getLogger(__name__)

CACHE_DIR = "prompt_codes"


def tokenizer_digest(vq, prompt_size: int) -> str:
    """A short digest of the VQ tokenizer's weights and config and the prompt size."""
    h = hashlib.sha256(repr(sorted(vars(vq.cfg).items())).encode() + str(prompt_size).encode())
    for name, tensor in sorted(vq.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _stamp(path: str) -> Tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def cached_prompt_codes(lr_paths: Sequence[str], vq, prompt_size: int, cache_dir: Path,
                        batch_size: int = 16) -> Tuple[List[np.ndarray], int]:
    """Codes [h, w] of each LR image, from the cache where its entry is current, else encoded
    (and the cache rewritten). Returns (codes in `lr_paths` order, how many were encoded now).
    An unreadable LR is a RuntimeError naming the file."""
    cache = Path(cache_dir) / f"{tokenizer_digest(vq, prompt_size)}.npz"
    known: Dict[str, Tuple[Tuple[int, int], np.ndarray]] = {}
    if cache.is_file():
        try:
            with np.load(cache) as z:
                for p, s, c in zip(z["paths"].tolist(), z["stamps"].tolist(), z["codes"]):
                    known[p] = (tuple(s), c)
        except (OSError, ValueError, KeyError) as exc:  # damaged: encode again, say so
            log.warning("prompt-code cache %s unreadable (%s): encoding the prompts again", cache, exc)
            known = {}
    stamps = [_stamp(p) for p in lr_paths]
    todo = [i for i, (p, s) in enumerate(zip(lr_paths, stamps)) if p not in known or known[p][0] != s]
    for at in range(0, len(todo), batch_size):
        chunk = todo[at:at + batch_size]
        images = []
        for i in chunk:
            img, why, _ = open_image(lr_paths[i])
            if img is None:
                raise BadPath(f"manifest LR image unreadable: {lr_paths[i]}: {why}; run `realsr-r1 prepare-data` again or "
                              "point data.manifest at the folder it wrote")
            images.append(img)
        for i, codes in zip(chunk, vq.encode_images(images, prompt_size, batch_size=batch_size)):
            known[lr_paths[i]] = (stamps[i], codes.astype(np.int16))
    if todo:
        cache.parent.mkdir(parents=True, exist_ok=True)
        paths = sorted(known)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, paths=np.array(paths), stamps=np.array([known[p][0] for p in paths], dtype=np.int64),
                 codes=np.stack([known[p][1] for p in paths]))
        os.replace(tmp, cache)  # a run killed mid-write leaves the old cache whole
    return [known[p][1].astype(np.int64) for p in lr_paths], len(todo)
