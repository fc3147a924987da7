"""Same-node weight transport: learner rank 0 -> rollout workers through one shared-memory file.

When the sender and a receiver share a node, the weights need not cross the network group:
the writer copies every tensor into its slice of ONE file under /dev/shm (tmpfs, i.e. RAM) and
publishes a small JSON header; readers map the file and hand out zero-copy views. A folder holds

    header.json         {version, write_serial, complete, data_file, total_bytes,
                         tensors: [[name, shape, dtype, offset], ...]}      (published atomically)
    weights-<id>.bin    every tensor's bytes at its offset (64-byte aligned), preallocated

Layout and reuse: the data file is kept across versions while the byte layout (offsets and
total size) is unchanged, so a steady run allocates and faults it in once; a new layout gets a
new file (new name, new inode) and the old one is unlinked after the header points at the new
one (a reader still mapping it keeps its pages until it lets go).

Protocol: the driver lets readers read only after `write`/`commit` has returned, and the writer
writes again only after every reader has finished loading; so write-then-publish is enough and
no lock is needed. Misuse is detected, not prevented: before overwriting a file in place the
writer publishes `complete: false` (a read then fails with "being written"), and a reader
re-checks the header when its iterator is exhausted and raises if the file it read was
rewritten meanwhile. Views are read-only mappings (writing through one crashes the process,
which beats silently corrupting every other reader) and show the newest bytes of their file:
load or clone them before the next write.

Memory: the file takes the weights' size in /dev/shm (shared with Ray's object store), plus the
previous layout's file while a reader still maps it.

Two ways to write, so one parameter walk can feed this and the network group at once:
    stats = writer.write(metas, tensors, version)      # this transport only
or
    passing = writer.tee(metas, tensors, version)      # yields each tensor once copied in
    transport.send(metas, passing, version)            # e.g. remote workers get the same walk
    stats = writer.commit()                            # then publish for same-node readers
`commit` is explicit because a consumer such as `WeightTransport.send` takes exactly
len(metas) items and never exhausts the generator.
"""

from __future__ import annotations

import json
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from comm.transport import SyncStats, TensorMeta

ALIGN_BYTES = 64
HEADER_NAME = "header.json"


class SharedWeightsError(RuntimeError):
    """The shared-memory weights cannot be read or written as asked."""


class NothingWrittenError(SharedWeightsError):
    """No version has been published in the folder yet."""


class VersionMismatchError(SharedWeightsError):
    """The folder holds another version than the reader expected."""


SHM_ROOT = Path("/dev/shm")
OWNER_NAME = "owner.pid"  # the writer's process id: a folder whose writer is gone is an orphan


def shm_dir(tag: str) -> Path:
    """The default folder for one run's weights: /dev/shm/realsr-r1-<tag>."""
    return SHM_ROOT / f"realsr-r1-{tag}"


def remove_orphans(root: Path = SHM_ROOT) -> List[Path]:
    """Delete the weight folders under `root` whose writer process no longer runs (a writer
    killed before it could clean up, e.g. a learner worker of a run that was killed); /dev/shm is
    memory, so a stale copy of the weights would hold RAM until reboot. Returns what was removed."""
    import shutil

    removed = []
    for folder in root.glob("realsr-r1-*"):
        try:
            pid = int((folder / OWNER_NAME).read_text())
        except (OSError, ValueError):
            continue  # no owner recorded (not ours, or being created): leave it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        except PermissionError:
            pass  # alive, another user's
    return removed


def plan_offsets(metas: Sequence[TensorMeta]) -> Tuple[List[int], int]:
    """Byte offset of each tensor (aligned to ALIGN_BYTES) and the end of the last one."""
    offsets, end = [], 0
    for _, shape, dtype in metas:
        end = -(-end // ALIGN_BYTES) * ALIGN_BYTES
        offsets.append(end)
        end += _nbytes(shape, dtype)
    return offsets, end


def _nbytes(shape, dtype_name: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * getattr(torch, dtype_name).itemsize


def _slice_view(flat: torch.Tensor, offset: int, shape, dtype_name: str) -> torch.Tensor:
    """The tensor of `shape`/`dtype_name` stored in uint8 `flat` at byte `offset` (no copy)."""
    piece = flat[offset:offset + _nbytes(shape, dtype_name)]
    return piece.view(getattr(torch, dtype_name)).view(tuple(shape))


def _read_header(folder: Path) -> dict:
    try:
        return json.loads((folder / HEADER_NAME).read_text())
    except FileNotFoundError:
        raise NothingWrittenError(f"nothing written yet: no {HEADER_NAME} in {folder}") from None
    except json.JSONDecodeError as e:
        raise SharedWeightsError(f"{folder / HEADER_NAME} is not a valid header: {e}") from None


class SharedMemoryWeightWriter:
    """The sender side (learner rank 0): owns the folder and its data file."""

    def __init__(self, folder: os.PathLike | str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / OWNER_NAME).write_text(str(os.getpid()))
        self.data_path: Optional[Path] = None  # the data file of the current layout (None before a write)
        self._layout: Optional[Tuple[List[int], int]] = None  # (offsets, total bytes) it holds
        self._flat: Optional[torch.Tensor] = None  # uint8 view of the whole mapped file
        try:  # go on numbering after a previous writer of this folder
            self._serial = int(_read_header(self.folder).get("write_serial", 0))
        except SharedWeightsError:
            self._serial = 0
        self._pending: Optional[dict] = None  # the write tee() started and commit() publishes
        self._last_header: Optional[dict] = None  # the header this writer last published

    def write(self, metas: Sequence[TensorMeta], tensors: Iterable[torch.Tensor], version: int) -> SyncStats:
        """Copy every tensor (same order as `metas`) into the file and publish `version`."""
        for _ in self.tee(metas, tensors, version):
            pass
        return self.commit()

    def tee(self, metas: Sequence[TensorMeta], tensors: Iterable[torch.Tensor], version: int) -> Iterator[torch.Tensor]:
        """Start writing `version`: returns a generator yielding each tensor of `tensors`
        unchanged once it is copied in. Call `commit()` after the last one to publish."""
        if self._pending is not None:
            raise SharedWeightsError(f"version {self._pending['version']} was started with tee() and not committed")
        t0 = time.perf_counter()
        metas = [(str(n), tuple(int(s) for s in shape), str(d)) for n, shape, d in metas]
        layout = plan_offsets(metas)
        if layout != self._layout:
            self._allocate(layout[1])
            self._layout = layout
        elif self._last_header and self._last_header["data_file"] == self.data_path.name:
            self._publish(dict(self._last_header, complete=False))  # overwriting what readers map: say so first
        self._pending = {"version": int(version), "metas": metas, "written": 0, "bytes": 0, "t0": t0}
        return self._copy_in(tensors, self._pending)

    def _copy_in(self, tensors: Iterable[torch.Tensor], pending: dict) -> Iterator[torch.Tensor]:
        metas, offsets = pending["metas"], self._layout[0]
        for i, t in enumerate(tensors):
            if i >= len(metas):
                raise SharedWeightsError(f"more tensors than the {len(metas)} metas describe")
            name, shape, dtype = metas[i]
            if tuple(t.shape) != shape or t.dtype != getattr(torch, dtype):
                raise SharedWeightsError(f"tensor {i} ({name}) is {tuple(t.shape)} {t.dtype}, "
                                         f"its meta says {shape} {dtype}")
            _slice_view(self._flat, offsets[i], shape, dtype).copy_(t.detach())
            pending["written"] += 1
            pending["bytes"] += t.numel() * t.element_size()
            yield t

    def commit(self) -> SyncStats:
        """Publish the version `tee` started (every tensor must have been copied in)."""
        pending, self._pending = self._pending, None
        if pending is None:
            raise SharedWeightsError("commit() without a tee() to publish")
        metas, offsets = pending["metas"], self._layout[0]
        if pending["written"] != len(metas):
            raise SharedWeightsError(f"only {pending['written']} of {len(metas)} tensors were copied in "
                                     f"for version {pending['version']}; not published")
        self._publish({"version": pending["version"], "complete": True, "data_file": self.data_path.name,
                       "total_bytes": self._layout[1],
                       "tensors": [[n, list(s), d, o] for (n, s, d), o in zip(metas, offsets)]})
        for stale in self.folder.glob("weights-*.bin"):  # earlier layouts, crashed writers
            if stale != self.data_path:
                stale.unlink(missing_ok=True)
        return SyncStats(pending["version"], pending["bytes"], time.perf_counter() - pending["t0"], 1)

    def _allocate(self, total_bytes: int) -> None:
        """A new data file of `total_bytes` with every page allocated now (so a full /dev/shm
        fails here with a message, not with SIGBUS in the middle of a copy)."""
        path = self.folder / f"weights-{uuid.uuid4().hex[:12]}.bin"
        size = max(total_bytes, ALIGN_BYTES)  # a zero-length file cannot be mapped
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            os.close(fd)
            path.unlink(missing_ok=True)
            free = os.statvfs(self.folder)
            raise SharedWeightsError(f"cannot allocate {size / 1e6:.1f} MB in {self.folder} "
                                     f"({free.f_bavail * free.f_frsize / 1e6:.1f} MB free): {e}") from None
        os.close(fd)
        self._flat = torch.from_file(str(path), shared=True, size=size, dtype=torch.uint8)
        self.data_path = path

    def _publish(self, header: dict) -> None:
        """Replace header.json atomically (write a temporary file, then rename over)."""
        self._serial += 1
        header = dict(header, write_serial=self._serial)
        tmp = self.folder / f".{HEADER_NAME}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(header))
        os.replace(tmp, self.folder / HEADER_NAME)
        self._last_header = header

    def remove(self) -> None:
        """Delete the header, every data file and the folder (readers keep what they mapped)."""
        self._flat, self.data_path, self._layout, self._pending = None, None, None, None
        for f in (list(self.folder.glob("weights-*.bin")) + list(self.folder.glob(f"*{HEADER_NAME}*"))
                  + [self.folder / OWNER_NAME]):
            f.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass  # something else lives there too: leave it


class SharedMemoryWeightReader:
    """The receiver side (a rollout worker on the writer's node). Keeps the data file mapped
    between reads (re-mapping only when the writer re-lays it out), so a steady run faults the
    pages into this process once."""

    def __init__(self, folder: os.PathLike | str):
        self.folder = Path(folder)
        self._mapped_key = None  # (st_dev, st_ino, st_size) of the file mapped
        self._flat: Optional[torch.Tensor] = None

    def read(self, expected_version: Optional[int] = None) -> Tuple[int, Iterator[Tuple[str, torch.Tensor]]]:
        """(version, iterator of (name, tensor)) over the published weights; the tensors are
        read-only zero-copy views into the file. Raises if `expected_version` is given and the
        folder holds another one, if nothing was written, or if a write is under way."""
        header = _read_header(self.folder)
        version = int(header["version"])
        if not header.get("complete", False):
            raise SharedWeightsError(f"{self.folder} is being written over version {version} "
                                     f"(or its writer died mid-write); read after the write returns")
        if expected_version is not None and version != expected_version:
            raise VersionMismatchError(f"expected weights version {expected_version}, "
                                       f"{self.folder} holds version {version}")
        self._map(self.folder / header["data_file"], int(header["total_bytes"]))
        return version, self._views(header)

    def _map(self, path: Path, total_bytes: int) -> None:
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise SharedWeightsError(f"data file {path} is gone (a newer write re-laid it out?)") from None
        with f:
            st = os.fstat(f.fileno())
            if st.st_size < total_bytes:
                raise SharedWeightsError(f"data file {path} is {st.st_size} bytes, shorter than the "
                                         f"{total_bytes} its header says")
            key = (st.st_dev, st.st_ino, st.st_size)
            if key != self._mapped_key:
                self._flat = None  # drop the old mapping first
                array = np.memmap(f, mode="r", dtype=np.uint8, shape=(st.st_size,))
                with warnings.catch_warnings():  # read-only on purpose (see the module doc)
                    warnings.filterwarnings("ignore", message=".*not writable.*")
                    self._flat = torch.from_numpy(array)
                self._mapped_key = key

    def _views(self, header: dict) -> Iterator[Tuple[str, torch.Tensor]]:
        flat = self._flat
        for name, shape, dtype, offset in header["tensors"]:
            yield name, _slice_view(flat, int(offset), shape, dtype)
        try:
            now = _read_header(self.folder)
        except SharedWeightsError:
            return  # removed after the read: what was read was whole
        if now["data_file"] == header["data_file"] and now.get("write_serial") != header.get("write_serial"):
            raise SharedWeightsError(f"{self.folder}: version {header['version']} was overwritten (now "
                                     f"{now['version']}, complete={now.get('complete')}) while being read")

    def close(self) -> None:
        """Let go of the mapping (views already handed out keep it alive until dropped)."""
        self._flat, self._mapped_key = None, None
