"""The Ray rollout worker: one engine per actor (vLLM or HF), weights from the learner.

One engine per process on purpose: vLLM's transformers backend patches the HF model
classes of the process it runs in, so an HF model cannot be built beside it.
Workers scale with `rollout.num_workers` (GPUs per worker and tensor-parallel size from
config) independently of the learner. Weights arrive through the transport the wiring
code hands in (`join_weight_group(factory)`; `comm.transport.WeightTransport`):
`receive_weights()` streams bucket by bucket into the engine and stamps the version.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import ray

from comm.nodes import here, role_device
from comm.shm_weights import SharedMemoryWeightReader
from rollout.config import RolloutConfig
from rollout.engine import RolloutEngine


def make_engine(cfg: RolloutConfig, policy_dir: str, image_cfg, policy_cfg=None, device: str = "cpu") -> RolloutEngine:
    """`policy_cfg` (a `vlcot.config.PolicyConfig`) gives the conversation format and dtype;
    None = the checkpoint's own conversation preset."""
    # local: an engine loads its model stack (vllm, or transformers) in the worker, not the driver
    if cfg.engine == "vllm":
        from rollout.vllm_engine import VLLMEngine

        return VLLMEngine(cfg, policy_dir, image_cfg, policy_cfg, device)
    from rollout.hf_engine import HFEngine

    return HFEngine(cfg, policy_dir, image_cfg, policy_cfg, device)


@ray.remote
class RolloutWorker:
    def __init__(self, cfg: RolloutConfig, policy_dir: str, image_cfg, policy_cfg=None, worker_index: int = 0):
        import torch

        self.cfg = cfg
        self.index = worker_index
        device = role_device(f"rollout worker {worker_index}", cfg.gpus_per_worker)  # raises: GPUs configured, none usable
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        self.engine = make_engine(cfg, policy_dir, image_cfg, policy_cfg, device)
        self.transport = None
        self.place = here()

    def ready(self) -> Dict[str, Any]:
        return {"index": self.index, "pid": os.getpid(), "engine": self.cfg.engine, "version": self.engine.version,
                "max_new_tokens": self.engine.max_new_tokens, "node_ip": self.place.ip, "node_id": self.place.node_id}

    def generate(self, prompts: Sequence[Sequence[int]], n: Optional[int] = None, seed: Optional[int] = None,
                 greedy: bool = False) -> List[Any]:
        return self.engine.generate(prompts, n, seed, greedy)

    def join_weight_group(self, make_transport: Callable[..., Any]) -> bool:
        self.transport = make_transport(local_host=self.place.ip)
        return True

    def read_shared_weights(self, folder: str, version: int) -> Dict[str, float]:
        """Load the weights learner rank 0 wrote to shared memory on this node (`version` must be
        what the folder holds)."""
        import time

        t0 = time.perf_counter()
        if getattr(self, "shm_reader", None) is None or str(self.shm_reader.folder) != folder:
            self.shm_reader = SharedMemoryWeightReader(folder)
        got, stream = self.shm_reader.read(expected_version=version)
        n = self.engine.update_weights(stream, got)
        return {"version": float(got), "tensors": float(n), "seconds": time.perf_counter() - t0}

    def receive_weights(self) -> Dict[str, float]:
        """Block until the learner broadcasts; load every bucket as it lands."""
        import time

        if self.transport is None:
            raise RuntimeError("join_weight_group first")
        t0 = time.perf_counter()
        version, stream = self.transport.receive()
        n = self.engine.update_weights(stream, version)
        return {"version": float(version), "tensors": float(n), "seconds": time.perf_counter() - t0,
                "peak_live_buckets": float(stream.peak_live_buckets), "peak_live_bytes": float(stream.peak_live_bytes)}

    def update_weights(self, named_tensors: Dict[str, Any], version: int) -> int:
        """Direct path (tests, small models): numpy or torch tensors by name."""
        import torch

        return self.engine.update_weights(((k, torch.as_tensor(v)) for k, v in named_tensors.items()), version)

    def update_weights_from_path(self, path: str, version: int) -> int:
        self.engine.update_weights_from_path(path, version)
        return version

    def version(self) -> int:
        return self.engine.version

    def throughput(self) -> Dict[str, float]:
        return self.engine.throughput.as_dict()

    def get_parameter(self, name: str):
        t = self.engine.get_parameter(name)
        return None if t is None else t.detach().cpu().numpy()

    def checkpoint_view(self) -> Dict[str, Any]:
        """Every engine parameter under its checkpoint name, as numpy (checks of a weight sync)."""
        return {n: t.float().numpy() for n, t in self.engine.checkpoint_view().items()}

    def prompt_logprobs(self, sequences: List[List[int]]) -> List[List[float]]:
        return self.engine.prompt_logprobs(sequences)
