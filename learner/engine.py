"""The DeepSpeed learner on one rank: GRPO and SFT steps, full-weight streaming, checkpoints.

One `LearnerEngine` per data-parallel rank, set up like a torchrun rank (RANK, WORLD_SIZE,
MASTER_ADDR/PORT in the environment). ZeRO stage 2 or 3 from config; fp32 on CPU (gloo,
`DS_ACCELERATOR=cpu`), bf16 on GPU (NCCL) with fp32 gradient accumulation and communication
overlapped with compute; a rank configured with GPUs that finds none stops at start-up. Under
ZeRO-3 the learner's passes drive DeepSpeed's parameter trace (learner/zero3.py), so
parameters are prefetched along it. Losses are normalised by global (all ranks, all
micro-batches) token or sequence counts, so the gradient equals the one a single process
would compute on the whole minibatch.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from comm.nodes import role_device
from learner.config import LearnerConfig
from learner.deepspeed_config import deepspeed_config
from learner.grpo import AGGREGATIONS, POLICY_LOSSES, aggregate, kl_penalty, token_type_weights, truncated_is_weights
from learner.logprobs import sequence_logprobs, use_chunked_head
from learner.packing import pack_micro_batches, plan_packs
from learner.shared_prompt import build_pack, pack_logprobs, resolve_shared_prompt, use_pack_attention
from learner.zero3 import ZeroTrace, begin_forward
from vlcot.policy import load_policy
from vlcot.shards import write_policy_folder

STATE_FILE = "learner_state.json"
DS_TAG = "state"  # DeepSpeed keeps its own "latest" pointer file beside the tag folder


def _disable_ds_shm_comm() -> None:
    """Skip DeepSpeed's CPU shared-memory collective op (a 40-100 s JIT compile on first use;
    only an optimisation over gloo). `deepspeed.comm.torch` must be patched as a module."""
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


class LearnerEngine:
    def __init__(self, cfg: LearnerConfig, policy_dir: str):
        self.cfg = cfg
        self.policy_dir = str(policy_dir)
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        # configured GPUs that torch cannot use stop here, before DeepSpeed or any model load
        self.on_gpu = role_device("learner", cfg.num_gpus) == "cuda"
        if not self.on_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        import deepspeed

        if not self.on_gpu and not cfg.ds_shm_comm:
            _disable_ds_shm_comm()
        deepspeed.init_distributed(dist_backend="nccl" if self.on_gpu else "gloo")
        self.dist = torch.distributed
        torch.manual_seed(cfg.seed + self.rank)
        self.dtype = torch.bfloat16 if (cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and self.on_gpu)) else torch.float32

        policy = load_policy(self.policy_dir, dtype=self.dtype)  # never an fp32 copy of a bf16 model
        self.layout = policy.layout
        model = policy.model
        # GRPO micro-batches are shared-prompt packs (learner/shared_prompt.py); `on` is refused here
        # for an attention backend the pack attention does not reproduce
        self.shared_prompt = resolve_shared_prompt(cfg.shared_prompt, model.config._attn_implementation)
        if self.shared_prompt:
            use_pack_attention(model)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        use_chunked_head(model)  # the chunked log-probs are one lm_head call per pass (ZeRO-3 gathers it once)
        model.train()
        conf = deepspeed_config(cfg, self.world, self.dtype, self.on_gpu, with_optimizer=True)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                               config=conf)
        self.device = self.engine.device
        self.trace = ZeroTrace.of(self.engine)  # ZeRO-3: the parameter trace that prefetching follows
        self.ref = None
        self.ref_trace: Optional[ZeroTrace] = None
        self.set_reference(self.policy_dir)
        self.step_count = 0
        self.version = 0

    def set_reference(self, hf_dir: str) -> bool:
        """(Re)build the frozen reference policy of the KL term / monitor from an HF policy
        folder: the policy GRPO starts from (the driver passes the in-run SFT result). No-op
        (False) when no reference is wanted."""
        import deepspeed

        g = self.cfg.grpo
        if not (g.kl_coef > 0 or g.kl_monitor):
            return False
        ref = load_policy(hf_dir, dtype=self.dtype).model.eval()
        if self.shared_prompt:
            use_pack_attention(ref)
        for p in ref.parameters():
            p.requires_grad_(False)
        use_chunked_head(ref)
        self.ref, self.ref_trace = None, None  # drop the old copy before building the new one
        if self.cfg.zero_stage == 3:
            conf = deepspeed_config(self.cfg, self.world, self.dtype, self.on_gpu, with_optimizer=False)
            self.ref, *_ = deepspeed.initialize(model=ref, config=conf)
            self.ref_trace = ZeroTrace.of(self.ref)
        else:
            self.ref = ref.to(self.device, self.dtype)
        return True

    # ---- configuration -----------------------------------------------------------------------
    def zero3_trace(self) -> Optional[str]:
        """The ZeRO-3 parameter trace's state: COMPLETE once the first pass is over (prefetch on),
        RECORD before; None below stage 3."""
        return self.trace.state if self.trace is not None else None

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def current_lr(self) -> float:
        return float(self.engine.optimizer.param_groups[0]["lr"])

    # ---- helpers -----------------------------------------------------------------------------
    def _allreduce(self, values: List[float]) -> List[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t)
        return t.tolist()

    def _tensor(self, a: np.ndarray, dtype=None) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(a))
        return t.to(self.device, dtype) if dtype is not None else t.to(self.device)

    @staticmethod
    def _trim(batch: Dict[str, np.ndarray], idx: np.ndarray) -> Tuple[Dict[str, np.ndarray], int]:
        """Rows `idx`, columns cut to the longest real sequence; returns the first response
        target position (so prompt positions need no log-probs)."""
        full = batch["attention_mask"].shape[1]
        length = int(batch["attention_mask"][idx].sum(1).max())

        def rows(v: np.ndarray) -> np.ndarray:
            if v.ndim == 1:
                return v[idx]
            return v[idx][:, : length if v.shape[1] == full else length - 1]  # per-token or per-target columns

        mb = {k: rows(v) for k, v in batch.items()}
        lm = mb["loss_mask"]
        starts = [int(np.argmax(row > 0)) for row in lm if row.any()]
        return mb, (min(starts) if starts else 0)

    def _micro_batches(self, idx: np.ndarray, batch: Optional[Dict[str, np.ndarray]] = None) -> List[np.ndarray]:
        """`idx` in micro-batches: its packs when `batch` is packed (`_with_packs`), else runs of
        micro_batch_size."""
        if batch is not None and "pack" in batch:
            return pack_micro_batches(batch["pack"], idx)
        m = self.cfg.micro_batch_size
        return [idx[i:i + m] for i in range(0, len(idx), m)]

    @staticmethod
    def _end_pass(trace: Optional[ZeroTrace]) -> None:
        """A forward (+ backward) pass of a ZeRO-3 engine is over: its trace advances (learner/zero3.py)."""
        if trace is not None:
            trace.end_pass()

    def _with_packs(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """A GRPO batch with its packs marked (`pack` [n]) when the shared-prompt pass is on: the
        learner group's plan when it sent one, else this rank's own."""
        if not self.shared_prompt or "pack" in batch:
            return batch
        plan = plan_packs(batch["input_ids"], batch["attention_mask"], batch["prompt_len"], 1, self.cfg.pack_max_tokens)[0]
        pack = np.empty(len(plan.rows), dtype=np.int64)
        pack[plan.rows] = plan.pack
        return dict(batch, pack=pack)

    @staticmethod
    def _forward_tokens(batch: Dict[str, np.ndarray]) -> float:
        """Tokens the policy reads for `batch` in one pass: a pack reads its prompt once."""
        tokens = float(batch["attention_mask"].sum())
        if "pack" in batch:
            firsts = np.unique(batch["pack"], return_index=True)[1]
            tokens -= float(batch["prompt_len"].sum() - batch["prompt_len"][firsts].sum())
        return tokens

    def _logp(self, model, mb: Dict[str, np.ndarray], start: int, with_entropy: bool):
        if "pack" in mb:  # one prompt and its responses in one sequence
            pack = build_pack(mb["input_ids"], mb["attention_mask"], mb["prompt_len"], start, self.device)
            shape = (len(mb["input_ids"]), mb["loss_mask"].shape[1] - start)
            return pack_logprobs(model, pack, shape, self.cfg.logprob_chunk, 1.0, with_entropy)
        ids = self._tensor(mb["input_ids"], torch.long)
        am = self._tensor(mb["attention_mask"], torch.long)
        return sequence_logprobs(model, ids, am, start, self.cfg.logprob_chunk, 1.0, with_entropy)

    # ---- GRPO --------------------------------------------------------------------------------
    def logprobs(self, batch: Dict[str, np.ndarray]) -> np.ndarray:
        """This rank's log-probs of every target of `batch` [n, L-1] (0 where unscored), as the
        loss sees them: what the rollout engine's log-probs of the same tokens must equal."""
        return self._old_logprobs(batch)

    @torch.no_grad()
    def _old_logprobs(self, batch: Dict[str, np.ndarray]) -> np.ndarray:
        out = np.zeros(batch["loss_mask"].shape, dtype=np.float32)
        batch = self._with_packs(batch)
        self.engine.module.eval()
        for idx in self._micro_batches(np.arange(len(batch["input_ids"])), batch):
            mb, start = self._trim(batch, idx)
            lp, _ = self._logp(self.engine.module, mb, start, False)
            self._end_pass(self.trace)
            out[idx, start:start + lp.shape[1]] = lp.float().cpu().numpy()
        self.engine.module.train()
        return out

    def grpo_step(self, batch: Dict[str, np.ndarray]) -> Dict[str, float]:
        """One rollout batch (this rank's shard): ppo_epochs x minibatches optimizer steps.

        batch: input_ids, attention_mask [n, L]; loss_mask, rollout_logp, is_image [n, L-1]
        (aligned with target tokens 1..L-1); advantages [n]; optional old_logp [n, L-1].
        """
        g = self.cfg.grpo
        t0 = time.perf_counter()
        batch = self._with_packs(batch)
        n = len(batch["input_ids"])  # minibatches take whole packs, or single samples
        units = self._micro_batches(np.arange(n), batch) if "pack" in batch else [np.array([i]) for i in range(n)]
        norm_tokens = g.norm_tokens or batch["loss_mask"].shape[1]
        recompute = g.recompute_old_logp == "always" or (
            g.recompute_old_logp == "auto" and (g.ppo_epochs > 1 or g.minibatches > 1))
        if "old_logp" not in batch and recompute:
            batch = dict(batch, old_logp=self._old_logprobs(batch))
        sums = {"pg_loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip": 0.0, "ratio": 0.0, "tokens": 0.0,
                "is_weight": 0.0}
        grad_norms, rng = [], np.random.default_rng(self.cfg.seed + 7919 * self.step_count + self.rank)
        for epoch in range(g.ppo_epochs):
            order = rng.permutation(len(units)) if g.ppo_epochs > 1 or g.minibatches > 1 else np.arange(len(units))
            for part in np.array_split(order, g.minibatches):  # whole packs to a minibatch
                mini = np.concatenate([units[k] for k in part]) if len(part) else np.zeros(0, dtype=np.int64)
                grad_norms.append(self._grpo_minibatch(batch, mini, norm_tokens, sums))
                self.step_count += 1
        tot = dict(zip(sums, self._allreduce(list(sums.values()))))
        ntok = max(tot["tokens"], 1.0)
        counts = self._allreduce([float((batch["loss_mask"] * batch["is_image"]).sum()),
                                  float((batch["loss_mask"] * (1 - batch["is_image"])).sum()),
                                  self._forward_tokens(batch) * g.ppo_epochs])
        out = {
            "loss/policy": tot["pg_loss"] / (g.ppo_epochs * g.minibatches),
            "entropy": tot["entropy"] / ntok,
            "clip_fraction": tot["clip"] / ntok,
            "ratio_mean": tot["ratio"] / ntok,
            "is_weight_mean": tot["is_weight"] / ntok,
            "grad_norm": float(np.mean(grad_norms)),
            "lr": self.current_lr(),
            "tokens/image": counts[0],
            "tokens/text": counts[1],
            "tokens/learner_forward": counts[2],  # read by the policy's training passes (all ranks)
            "timing/learn_s": time.perf_counter() - t0,
            "optimizer_steps": float(len(grad_norms)),
        }
        if self.ref is not None:  # KL to the reference (the policy GRPO started from)
            out["kl"] = tot["kl"] / ntok
        return out

    def _grpo_minibatch(self, batch, idx: np.ndarray, norm_tokens: int, sums: Dict[str, float]) -> float:
        g = self.cfg.grpo
        lm, img = batch["loss_mask"][idx], batch["is_image"][idx].astype(bool)
        w = np.where(img, g.image_token_weight, g.text_token_weight) * lm
        denom = self._allreduce([AGGREGATIONS.get(g.loss_agg).local_denominator(lm, w, norm_tokens)])[0]
        loss_fn = POLICY_LOSSES.get(g.policy_loss)
        micro = self._micro_batches(idx, batch)
        for k, midx in enumerate(micro):
            self.engine.set_gradient_accumulation_boundary(k == len(micro) - 1)
            begin_forward(self.engine)  # the engine's own forward is bypassed: its bookkeeping is not
            mb, start = self._trim(batch, midx)
            logp, ent = self._logp(self.engine.module, mb, start, self.cfg.log_entropy)
            sl = slice(start, start + logp.shape[1])
            mask = self._tensor(mb["loss_mask"][:, sl], torch.float32)
            adv = self._tensor(mb["advantages"], torch.float32)
            old = self._tensor(mb["old_logp"][:, sl], torch.float32) if "old_logp" in mb else logp.detach()
            is_w = None
            if g.tis_cap > 0 and "rollout_logp" in mb:
                is_w = truncated_is_weights(old, self._tensor(mb["rollout_logp"][:, sl], torch.float32), g.tis_cap)
            tw = token_type_weights(self._tensor(mb["is_image"][:, sl]).bool(), g.text_token_weight, g.image_token_weight)
            loss, st = loss_fn(logp, old, adv, mask, g.clip_low, g.clip_high, g.loss_agg, tw, is_w, denom, norm_tokens)
            sums["pg_loss"] += float(loss.detach())
            if self.ref is not None:
                with torch.no_grad():
                    ref_logp, _ = self._logp(self.ref.module if hasattr(self.ref, "module") else self.ref, mb, start, False)
                    self._end_pass(self.ref_trace)
                kl = kl_penalty(logp, ref_logp, g.kl_estimator)
                if g.kl_coef > 0:
                    loss = loss + g.kl_coef * aggregate(kl, mask, g.loss_agg, tw, denom, norm_tokens)
                sums["kl"] += float((kl.detach() * mask).sum())
            n_tok = float(mask.sum())
            sums["tokens"] += n_tok
            sums["clip"] += float(st["clip_fraction"]) * n_tok
            sums["ratio"] += float(st["ratio_mean"]) * n_tok
            sums["is_weight"] += float((is_w * mask).sum()) if is_w is not None else n_tok
            if ent is not None:
                sums["entropy"] += float((ent * mask).sum())
            # DeepSpeed averages gradients over ranks; the loss is already a global mean.
            self.engine.backward(loss * self.world, scale_wrt_gas=False)
            self._end_pass(self.trace)
        self.engine.step()
        gn = self.engine.get_global_grad_norm()
        return float(gn) if gn is not None else float("nan")

    # ---- SFT ---------------------------------------------------------------------------------
    def sft_step(self, batch: Dict[str, np.ndarray]) -> Dict[str, float]:
        """One optimizer step of next-token cross-entropy on response tokens (loss_mask)."""
        t0 = time.perf_counter()
        idx = np.arange(len(batch["input_ids"]))
        denom = self._allreduce([float(batch["loss_mask"].sum())])[0]
        micro = self._micro_batches(idx)
        total = 0.0
        for k, midx in enumerate(micro):
            self.engine.set_gradient_accumulation_boundary(k == len(micro) - 1)
            begin_forward(self.engine)
            mb, start = self._trim(batch, midx)
            logp, _ = self._logp(self.engine.module, mb, start, False)
            mask = self._tensor(mb["loss_mask"][:, start:start + logp.shape[1]], torch.float32)
            loss = -(logp * mask).sum() / max(denom, 1.0)
            total += float(loss.detach())
            self.engine.backward(loss * self.world, scale_wrt_gas=False)
            self._end_pass(self.trace)
        self.engine.step()
        self.step_count += 1
        loss = self._allreduce([total])[0]
        gn = self.engine.get_global_grad_norm()
        return {"loss/sft": loss, "grad_norm": float(gn) if gn is not None else float("nan"),
                "lr": self.current_lr(), "timing/learn_s": time.perf_counter() - t0}

    # ---- full weights ------------------------------------------------------------------------
    def _params(self, trainable_only: bool):
        return ((n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad or not trainable_only)

    def param_metas(self, trainable_only: bool = False) -> List[Tuple[str, Tuple[int, ...], str]]:
        out = []
        for name, p in self._params(trainable_only):
            shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
            out.append((name, shape, str(p.dtype).replace("torch.", "")))
        return out

    def iter_full_params(self, trainable_only: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
        """(name, full tensor) in `param_metas` order. Every rank must iterate (ZeRO-3
        gathers are collective); tensors are only meaningful on rank 0. A gathered (ZeRO-3)
        tensor is a copy that outlives its gather; any other is the live parameter itself
        (read-only use: the weight transports copy it into their buffers)."""
        import deepspeed

        for name, p in self._params(trainable_only):
            if hasattr(p, "ds_id"):
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    yield name, p.data.detach().clone()
            else:
                yield name, p.data.detach()

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        return {name: t.cpu().clone() for name, t in self.iter_full_params()}

    def param_digest(self) -> str:
        """A hash of the full parameters (every rank computes it: ZeRO-3 gathers)."""
        import hashlib

        h = hashlib.sha256()
        for name, t in self.iter_full_params():
            h.update(name.encode())
            h.update(t.float().cpu().numpy().tobytes())
        return h.hexdigest()

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self, path: str, extra_state: Optional[Dict[str, Any]] = None) -> None:
        """HF-layout safetensors (+ tokenizer) in `path/hf`, DeepSpeed model+optimizer state in
        `path/ds`, learner step and version in `path/learner_state.json`. All ranks call."""
        path_ = Path(path)
        self.save_policy(str(path_ / "hf"))
        self.engine.save_checkpoint(str(path_ / "ds"), tag=DS_TAG, client_state={"step_count": self.step_count})
        if self.rank == 0:
            state = {"step_count": self.step_count, "version": self.version, **(extra_state or {})}
            (path_ / STATE_FILE).write_text(json.dumps(state, indent=2))
        self.dist.barrier()

    def save_policy(self, path: str) -> None:
        """The current weights as an HF policy folder, in the learner's dtype, streamed shard by
        shard (rank 0 writes; every rank walks the parameters, since ZeRO-3 gathers are
        collective). Config and tokenizer files are copied from the policy folder."""
        write_policy_folder(path, self.iter_full_params(), self.policy_dir, self.dtype,
                            max_shard_bytes=self.cfg.save_shard_mb << 20, write=self.rank == 0)
        self.dist.barrier()

    def load(self, path: str) -> Dict[str, Any]:
        path_ = Path(path)
        _, client = self.engine.load_checkpoint(str(path_ / "ds"), tag=DS_TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        state = json.loads((path_ / STATE_FILE).read_text())
        self.step_count = int(state["step_count"])
        self.version = int(state["version"])
        return state
