"""Moving weights from the learner to rollout workers.

One protocol, two backends: gloo on CPU machines, NCCL on GPUs (tensors stay on the GPU).
The sender (learner rank 0) and every receiver (rollout worker) join a process group of
their own — independent of DeepSpeed's default group — through a TCP store. A send is:

    header  = pickled {version, [(name, shape, dtype) ...], bucket layout}   (length, bytes)
    buckets = one flat tensor per bucket of <= bucket_bytes, same dtype      (broadcast)

so receivers allocate exactly what arrives and split it back into named tensors. Buckets
bound the extra memory on both sides (the sender never concatenates the whole model).
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

TensorMeta = Tuple[str, Tuple[int, ...], str]  # name, shape, dtype name


@dataclass
class SyncStats:
    version: int
    bytes: int
    seconds: float
    buckets: int

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / max(self.seconds, 1e-9)


def plan_buckets(metas: Sequence[TensorMeta], bucket_bytes: int) -> List[List[int]]:
    """Group tensor indices into buckets of one dtype and at most `bucket_bytes` (a tensor
    larger than the bound gets a bucket of its own). Order is preserved."""
    buckets: List[List[int]] = []
    cur: List[int] = []
    cur_bytes, cur_dtype = 0, None
    for i, (_, shape, dtype) in enumerate(metas):
        nbytes = _numel(shape) * torch.empty(0, dtype=getattr(torch, dtype)).element_size()
        if cur and (dtype != cur_dtype or cur_bytes + nbytes > bucket_bytes):
            buckets.append(cur)
            cur, cur_bytes = [], 0
        cur.append(i)
        cur_bytes += nbytes
        cur_dtype = dtype
    if cur:
        buckets.append(cur)
    return buckets


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def group_options(backend: str, timeout: timedelta, hostname: str):
    """The options a weight group is built with, for both backends. `timeout` bounds every
    collective: NCCL's watchdog aborts the process when one waits longer (its own default is
    600 s, too short for an asynchronous receive that waits out a long learner step), so it
    must reach the group, not only the TCP store. gloo binds its connections at `hostname`."""
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=hostname)]
    else:
        opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return opts


class WeightTransport:
    """A process group of {sender: rank 0, receivers: 1..world-1}.

    backend: "gloo" (CPU tensors) or "nccl" (CUDA tensors). `host`/`port` is the TCP store
    that rank 0 serves (on rank 0's node address); every member must construct its transport
    concurrently (a group forms when all `world_size` members have joined). `local_host` is
    this member's own node address: gloo binds its connections there (left to itself it
    resolves the machine's hostname, an address other nodes may not reach). `timeout_s` is the
    store's and every collective's timeout (`trainer.weight_sync_timeout_s`), NCCL's included.
    """

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str = "gloo",
                 timeout_s: float = 300.0, device: Optional[str] = None, local_host: Optional[str] = None):
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"transport backend {backend!r} not in ['gloo', 'nccl']")
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.device = torch.device(device or ("cuda" if backend == "nccl" else "cpu"))
        self.spare: Optional[torch.UntypedStorage] = None  # a received bucket's buffer kept for the next receive
        self._staging: Optional[torch.Tensor] = None  # the sender's bucket buffer, kept across sends
        timeout = timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout)
        group = dist.ProcessGroupGloo if backend == "gloo" else dist.ProcessGroupNCCL
        self.pg = group(self.store, rank, world_size, group_options(backend, timeout, local_host or host))

    def _bcast(self, t: torch.Tensor) -> torch.Tensor:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([t], opts).wait()
        return t

    def _bcast_bytes(self, payload: Optional[bytes]) -> bytes:
        n = torch.tensor([len(payload) if payload is not None else 0], dtype=torch.int64, device=self.device)
        self._bcast(n)
        buf = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device) if payload is not None
               else torch.empty(int(n.item()), dtype=torch.uint8, device=self.device))
        return bytes(self._bcast(buf).cpu().numpy().tobytes())

    # ---- sender ---------------------------------------------------------------------------
    def send(self, metas: Sequence[TensorMeta], tensors: Iterable[torch.Tensor], version: int,
             bucket_bytes: int = 256 << 20) -> SyncStats:
        """Broadcast tensors described by `metas` (same order as `tensors`, which may be a
        lazy generator, e.g. gathering ZeRO-3 shards one by one)."""
        assert self.rank == 0, "only rank 0 sends"
        t0 = time.perf_counter()
        buckets = plan_buckets(metas, bucket_bytes)
        self._bcast_bytes(pickle.dumps({"version": version, "metas": list(metas), "buckets": buckets}))
        it = iter(tensors)
        total = 0
        for bucket in buckets:
            parts = [next(it).detach().reshape(-1) for _ in bucket]
            flat = self._stage(parts).to(self.device) if len(parts) > 1 else parts[0].to(self.device).contiguous()
            self._bcast(flat)
            total += flat.numel() * flat.element_size()
        return SyncStats(version, total, time.perf_counter() - t0, len(buckets))

    def _stage(self, parts: List[torch.Tensor]) -> torch.Tensor:
        """The parts concatenated into one staging buffer kept across buckets and sends: a new
        buffer per bucket would fault in fresh pages every time (the allocator hands large
        blocks back to the OS), which costs more than the copy itself."""
        need = sum(p.numel() for p in parts)
        st = self._staging
        if st is None or st.dtype != parts[0].dtype or st.device != parts[0].device or st.numel() < need:
            st = self._staging = torch.empty(need, dtype=parts[0].dtype, device=parts[0].device)
        return torch.cat(parts, out=st[:need])

    # ---- receiver -------------------------------------------------------------------------
    def receive(self) -> Tuple[int, "BucketStream"]:
        """(version, stream of (name, tensor)). Consume the stream fully: buckets arrive as it
        advances, so a consumer that loads each tensor and lets go of it holds about two
        buckets at a time (the stream measures how many were alive at once)."""
        header = pickle.loads(self._bcast_bytes(None))
        return header["version"], BucketStream(self, header["metas"], header["buckets"])

    def receive_all(self) -> Tuple[int, Dict[str, torch.Tensor]]:
        version, it = self.receive()
        return version, {name: t.clone() for name, t in it}

    def close(self) -> None:
        self.pg = None
        self.store = None


class BucketStream:
    """Iterator over the (name, tensor) pairs of one broadcast, bucket by bucket.

    `peak_live_buckets` / `peak_live_bytes`: the most received buckets still referenced (by
    the stream or by its consumer, e.g. vLLM's loader) at the moment a new one is allocated.
    The stream keeps one handle on each bucket's storage and reads its use count, so the
    bound on the receiver's memory is measured, not assumed. A bucket only the stream still
    holds (its consumer let go of every piece: use count 1) is the buffer the next bucket is
    received into when it is big enough (fresh large allocations fault in new pages, which
    costs more than the receive); other free buckets are released. Where torch lacks the
    (private) use-count call, nothing is held or reused and both peaks stay -1 (unknown).
    """

    _use_count = getattr(torch._C, "_storage_Use_Count", None)

    def __init__(self, transport: WeightTransport, metas: Sequence[TensorMeta], buckets: List[List[int]]):
        self._transport, self._metas, self._buckets = transport, metas, buckets
        self._held: List[torch.UntypedStorage] = [transport.spare] if transport.spare is not None else []
        transport.spare = None
        self.peak_live_buckets = 0
        self.peak_live_bytes = 0

    def _free(self) -> List[torch.UntypedStorage]:
        return [st for st in self._held if self._use_count(st._cdata) == 1]

    def _allocate(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """A buffer for the next bucket: the best-fitting held storage nobody else references
        (at most twice the size needed), else a new one. Of the other free storages only the
        biggest stays held, as the spare for a later bucket or the next receive."""
        if self._use_count is None:
            return torch.empty(numel, dtype=dtype, device=self._transport.device)
        need = numel * torch.empty(0, dtype=dtype).element_size()
        fits = [st for st in self._free() if need <= st.nbytes() <= 2 * need]
        if fits:
            st = min(fits, key=lambda s: s.nbytes())
            self._held = [h for h in self._held if h is not st]
            flat = torch.empty(0, dtype=dtype, device=self._transport.device).set_(st, 0, (numel,))
        else:
            flat = torch.empty(numel, dtype=dtype, device=self._transport.device)
        free = self._free()
        spare = max(free, key=lambda s: s.nbytes()) if free else None
        self._held = [h for h in self._held if h not in free or h is spare]
        return flat

    def _track(self, flat: torch.Tensor) -> None:
        if self._use_count is None:
            self.peak_live_buckets = self.peak_live_bytes = -1
            return
        live = [st for st in self._held if self._use_count(st._cdata) > 1] + [flat.untyped_storage()]
        self._held.append(flat.untyped_storage())
        self.peak_live_buckets = max(self.peak_live_buckets, len(live))
        self.peak_live_bytes = max(self.peak_live_bytes, sum(st.nbytes() for st in live))

    def __iter__(self) -> Iterator[Tuple[str, torch.Tensor]]:
        metas = self._metas
        for bucket in self._buckets:
            dtype = getattr(torch, metas[bucket[0]][2])
            sizes = [_numel(metas[i][1]) for i in bucket]
            flat = self._allocate(dtype, sum(sizes))
            self._track(flat)
            pieces = torch.split(self._transport._bcast(flat), sizes)
            del flat  # from here only the pieces handed out keep the bucket alive
            for k, i in enumerate(bucket):
                name, shape, _ = metas[i]
                yield name, pieces[k].view(shape)
            del pieces
        if self._use_count is not None and self._held:
            # the biggest bucket waits for the next receive, which reuses it if its consumer has let
            # go by then (the last pieces handed out usually live until the consumer returns)
            self._transport.spare = max(self._held, key=lambda st: st.nbytes())
        self._held = []


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` (an address of the machine this runs on) right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
