"""The GRPO driver: a loop that reads like a single process; the role actors distribute it.

    for step:  prompts -> rollout pool (G samples each) -> parse -> reward pool
               -> group advantages -> learner group -> broadcast weights

`trainer.mode=async` is one-step-off: generation of step t+1 is dispatched before step t
trains, so it runs on the previous weights (version lag 1, bounded by
`trainer.max_staleness`); the learner then recomputes old log-probs and the truncated
importance weight corrects for the stale rollout policy.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from cluster.config import Config, flatten, to_yaml
from cluster.interpreters import runtime_env_for_iqa
from cluster.learner_group import LearnerGroup
from cluster.placement import RunPlacement, wanted
from cluster.reward_pool import RewardPool
from cluster.rollout_pool import RolloutBatch, RolloutPool
from learner.schedule import lr_at
from learner.step_batch import RolloutSamples, StepBatch, learner_batch
from training.contact_sheets import log_sample_sheet
from training.heldout_eval import heldout_for
from training.jobs import (cold_start_sft, encode_prompts, ensure_policy_dir, ensure_vq_dir, training_records,
                          required_cpus, start_ray)
from training.learning_curve import report_learning
from training.run_state import (CKPT_DIR, DataCursor, DriverState, latest_checkpoint, prune_checkpoints,
                               read_pending_step, write_pending_step)
from training.sample_scoring import score_results
from training.step_data import CollectedRollout, DispatchedStep, ScoredSample, StepOutcome, StepResult
from training.step_metrics import step_metrics, step_line
from training.tracking import open_run_tracker
from vlcot.errors import BadPath

log = logging.getLogger(__name__)
SFT_POLICY = "sft/hf"  # the cold-start SFT result: GRPO's starting point and its KL reference


class GRPOTrainer:
    def __init__(self, cfg: Config, resume: bool = False, progress: bool = True,
                 callbacks: Optional[List[Callable[[str, int, "GRPOTrainer"], None]]] = None):
        """`callbacks(event, step, trainer)` run at "dispatched" (a step's prompts are out to
        the rollout workers) and "step_end": monitoring and fault-injection hooks."""
        self.callbacks = list(callbacks or [])
        self.cfg = cfg
        self.resume = resume
        self.progress = progress
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.sft_examples = 0  # cold-start SFT traces trained on in this run (0: no in-run SFT)

    def learner_config(self):
        """The learner's configuration for this run (the caller's config is left as it is):
        one-step-off rollouts come from the previous policy, so the ratio is taken against the
        current one, recomputed (`recompute_old_logp: always`)."""
        lc = self.cfg.learner
        if self.cfg.trainer.mode == "async":
            return dataclasses.replace(lc, grpo=dataclasses.replace(lc.grpo, recompute_old_logp="always"))
        return lc

    # ---- setup -------------------------------------------------------------------------------
    def _read_inputs(self) -> None:
        """Every input checked before the tracking run opens or any actor starts: a refusal is one
        line, not a traceback, and leaves no empty run behind."""
        cfg = self.cfg
        if self.resume and latest_checkpoint(str(self.run_dir)) is None:
            raise BadPath(f"--resume: no checkpoint under {self.run_dir / CKPT_DIR}: leave out --resume to start "
                          "this run, or point run_dir at the run to continue")
        roles = (["sft"] if cfg.trainer.sft and cfg.learner.sft.steps > 0 and not self.resume else []) + ["rl"]
        read = {}
        for role in sorted(roles, key=lambda r: not getattr(cfg.data, f"{r}_manifest")):  # named ones first:
            read[role] = training_records(cfg, role)  # a bad one is refused before prepare-data runs for the other
        self.manifest, self.records = read["rl"]
        self.sft_manifest, self.sft_records = read.get("sft", (None, []))

    def _prepare(self) -> None:
        from vlcot.policy import load_policy_meta  # local: transformers and diffusers, loaded once the run starts
        from vlcot.vq import VQTokenizer

        cfg = self.cfg
        self.policy_dir = ensure_policy_dir(cfg)
        self.vq_dir = ensure_vq_dir(cfg)
        self.vq = VQTokenizer.load(self.vq_dir)
        self.meta = meta = load_policy_meta(self.policy_dir, cfg.policy, cfg.image, cfg.vq)
        self.tokenizer, self.layout, self.codec = meta.tokenizer, meta.layout, meta.codec
        self.prompt_ids = encode_prompts(self.records, self.vq, cfg.image, self.codec, self.layout, self.manifest)
        self.image_ids = self.layout.image_span_ids()
        spread = cfg.trainer.prompt_order == "spread"
        self.cursor = DataCursor(len(self.records), cfg.seed, [r.source for r in self.records] if spread else None)
        self.heldout = heldout_for(cfg, self.run_dir, self.vq, self.codec, self.layout,
                                   [r.degradation.labels for r in self.records])

    def _start_actors(self) -> None:
        cfg = self.cfg
        start_ray(required_cpus(cfg))
        t0, wait_s = time.perf_counter(), cfg.trainer.actor_start_timeout_s
        self.placement = RunPlacement(cfg, wait_s) if wanted(cfg) else None
        where = self.placement.for_role if self.placement else (lambda role: None)
        self.learner = LearnerGroup(self.learner_config(), str(self.policy_dir), placement=where("learner"),
                                    ready_timeout_s=wait_s)
        self.rewards = RewardPool(cfg.rewards, str(self.vq_dir), runtime_env_for_iqa(cfg.envs), placement=where("rewards"),
                                  ready_timeout_s=wait_s)
        self.rollout = RolloutPool(cfg.rollout, str(self.policy_dir), cfg.image, cfg.policy,
                                   placement=where("rollout"), ready_timeout_s=wait_s)
        self.rollout.connect_weights(self.learner, cfg)
        nodes = self.actor_nodes()
        print(f"actors up in {time.perf_counter() - t0:.0f}s: {cfg.learner.num_workers} learner ranks "
              f"(ZeRO-{cfg.learner.zero_stage}) on {nodes['learner']}, {cfg.rollout.num_workers} {cfg.rollout.engine} "
              f"rollout workers on {nodes['rollout']}, {cfg.rewards.num_workers} reward workers on {nodes['rewards']}; "
              f"rendezvous {self.learner.setup_reports[0]['master']}"
              + (f"; placement groups of {len(self.placement)} bundles" if self.placement else ""))

    def actor_nodes(self) -> Dict[str, List[str]]:
        """The node address of every actor, by role, in rank/slot order."""
        return {"learner": [p.ip for p in self.learner.places],
                "rollout": [r["node_ip"] for r in self.rollout.group.ready_reports],
                "rewards": [r["node_ip"] for r in self.rewards.group.ready_reports]}

    def _sft(self) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()

        def on_step(i, m):
            self.tracker.metrics({"sft/loss": m["loss/sft"], "sft/grad_norm": m["grad_norm"]}, step=i)
            if (i + 1) % cfg.learner.sft.log_every == 0:
                print(f"sft {i + 1}/{cfg.learner.sft.steps}: loss {m['loss/sft']:.4f}")

        manifest = self.sft_manifest  # read and checked in _prepare
        result = cold_start_sft(self.learner, self.sft_records, self.vq, self.meta, cfg, on_step)
        self.sft_examples = result.examples
        hist = result.history
        self.learner.set_lr(cfg.learner.lr)
        self.learner.save_policy(str(self.run_dir / SFT_POLICY))
        print(f"cold-start SFT: {len(hist)} steps on {result.examples} traces of {manifest}, loss {hist[0]['loss/sft']:.3f} -> "
              f"{hist[-1]['loss/sft']:.3f} in {time.perf_counter() - t0:.0f}s; policy in {self.run_dir / SFT_POLICY}")

    def _reference_is_sft(self) -> None:
        """The KL reference (when there is one) is the policy GRPO starts from: after in-run SFT
        that is the SFT result, not the initial policy the learner was built from. Read from disk
        so a resumed run gets the same reference."""
        sft = self.run_dir / SFT_POLICY
        if sft.is_dir():
            self.learner.set_reference(str(sft))
        else:
            log.warning("no %s in this run (made before it was saved): the KL reference is the initial policy", sft)

    # ---- one step: dispatch -> collect -> parse -> score -> advantages -> learn -> sync ----------
    def _dispatch(self, step: int) -> DispatchedStep:
        """Step `step`'s prompts (the next ones of the data cursor) out to the rollout pool."""
        records = self.cursor.take(self.cfg.trainer.prompts_per_step)
        batch = self.rollout.submit([self.prompt_ids[i] for i in records], seed=self.cfg.rollout.seed + 1000 * step)
        return DispatchedStep(step, records, batch)

    def _step(self, step: int, pending: Optional[DispatchedStep], version: int) -> StepOutcome:
        """GRPO step `step`, the one place that dispatches: its own prompts unless they are
        `pending` (already out, or collected into a checkpoint), and in async mode the next
        step's as soon as this one's generation is in, so that one overlaps scoring and learning."""
        cfg = self.cfg
        dispatched = pending if pending is not None else self._dispatch(step)
        self._emit("dispatched", step + 1)
        collected = self._collected(dispatched, version)
        following = None
        if cfg.trainer.mode == "async" and step + 1 < cfg.trainer.steps:
            following = self._dispatch(step + 1)
        t0 = time.perf_counter()
        scored = score_results(dispatched.records, collected.results, self.records, self.codec, self.layout,
                               cfg.image.hr_size, self.rewards, str(step))
        for refused in scored.refused:
            log.warning("step %d prompt %d skipped: %s", step, refused.record, refused.reason)
        samples = scored.samples
        reward_s = time.perf_counter() - t0
        chosen = self._learner_batch(samples, version)
        metrics = chosen.metrics
        self.learner.set_lr(self.lr_at(step + 1))
        learn = self.learner.grpo_step(chosen.arrays)
        synced = self.rollout.sync_weights(version + 1)  # drops or replaces workers lost since the collect
        metrics.update({"rollout/workers": float(collected.worker_count),
                        "rollout/workers_lost": float(len(collected.lost_nodes) + len(synced.lost_nodes)),
                        **collected.guidance})
        result = StepResult(samples, len(scored.refused), learn, synced.stats, metrics, collected.generate_s, reward_s)
        return StepOutcome(result, following)

    def _collected(self, dispatched: DispatchedStep, version: int) -> CollectedRollout:
        """The step's generation, collected from the rollout pool once (or read from a checkpoint)."""
        if dispatched.collected is None:
            dispatched.collected = self._collect(dispatched.rollout, version)
        return dispatched.collected

    def lr_at(self, step: int) -> float:
        """The learning rate of GRPO step `step` (1-based) under learner.schedule."""
        lc = self.cfg.learner
        return lr_at(step, lc.schedule, self.cfg.trainer.steps, lc.lr)

    def _learner_batch(self, samples: List[ScoredSample], version: int) -> StepBatch:
        """The learner's batch of this step's samples (learner/step_batch.py)."""
        names = list(self.cfg.rewards.weights)
        rollout = RolloutSamples([self.prompt_ids[s.record] for s in samples], [s.sample.token_ids for s in samples],
                                 [s.sample.logprobs for s in samples], [s.group for s in samples],
                                 [s.sample.version for s in samples], [s.reward.total for s in samples],
                                 {k: [s.reward.components[k] for s in samples] for k in names}
                                 if self.cfg.learner.grpo.normalise == "per_reward" else {})
        return learner_batch(rollout, version, self.cfg.learner.grpo, self.cfg.rewards.weights,
                             self.cfg.trainer.max_staleness, self.cfg.learner.num_workers,
                             self.tokenizer.pad_token_id or 0, self.image_ids)

    # ---- checkpoints -------------------------------------------------------------------------
    def _save(self, step: int, version: int, pending: Optional[DispatchedStep]) -> None:
        """Learner, driver state and (async mode) the next step's generation: it is collected
        now, which costs no time (the loop collects it next anyway), and stored, so a resumed run
        trains step + 1 on the samples drawn by the previous policy version, as this run does."""
        out = self.run_dir / CKPT_DIR / f"step_{step:06d}"
        self.learner.save(str(out), {"driver_step": step})
        if pending is not None:
            self._collected(pending, version)
            write_pending_step(out, pending)
        DriverState(step, version, self.cursor.state(), self.tracker.run_id, self.reward_history,
                    self.component_history, self._schedule_record()).write(out)
        prune_checkpoints(self.run_dir, self.cfg.trainer.keep_checkpoints)

    def _schedule_record(self) -> Dict[str, Any]:
        """What decides the learning rate of every step (stored with each checkpoint)."""
        lc = self.cfg.learner
        return {"lr": lc.lr, "steps": self.cfg.trainer.steps, **dataclasses.asdict(lc.schedule)}

    def _load(self) -> Tuple[int, int, Optional[DispatchedStep]]:
        ckpt = latest_checkpoint(str(self.run_dir))
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.run_dir / CKPT_DIR}")
        state = DriverState.read(ckpt)
        self.learner.load(str(ckpt))
        self.cursor.restore(state.cursor)
        self.reward_history = list(state.reward_history)
        self.component_history = {k: list(v) for k, v in state.component_history.items()}
        now = self._schedule_record()
        if state.lr_schedule is not None and state.lr_schedule != now:
            log.warning("the learning-rate schedule differs from the checkpoint's (%s, now %s): steps after %d "
                        "follow the new one", state.lr_schedule, now, state.step)
        print(f"resumed from {ckpt}: step {state.step}, policy version {state.version}")
        return state.step, state.version, read_pending_step(ckpt)

    # ---- the loop ----------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        from tqdm import tqdm

        cfg, t_run = self.cfg, time.perf_counter()
        self._read_inputs()
        # a required tracking server that does not answer refuses the run before anything starts
        self.tracker, ended = open_run_tracker(cfg, self.run_dir, self.resume), "FAILED"
        self.reward_history: List[float] = []
        self.component_history: Dict[str, List[float]] = {}
        try:
            self._prepare()
            self._start_actors()
            start, version, pending = self._load() if self.resume else (0, 0, None)
            if not self.tracker.resumed:
                self.tracker.params(flatten(cfg))
                (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
                self.tracker.artifact(str(self.run_dir / "config.yaml"))
            self.sft_ran = cfg.trainer.sft and cfg.learner.sft.steps > 0
            if self.sft_ran:
                if not self.resume:
                    self._sft()
                self._reference_is_sft()
            self.rollout.sync_weights(version)
            if start == 0 and self.heldout:
                self.heldout.at_start(functools.partial(self._generate_now, version=version), self.rewards,
                                      "SFT" if self.sft_ran else "initial", version)
            bar = tqdm(total=cfg.trainer.steps, initial=start, desc="grpo", disable=not self.progress)
            for step in range(start, cfg.trainer.steps):
                outcome = self._step(step, pending, version)
                pending = outcome.following
                version += 1
                self._record(step + 1, version, outcome.result, pending)
                bar.update(1)
                self._emit("step_end", step + 1)
                if cfg.rollout.autoscale and step + 1 < cfg.trainer.steps:
                    self._grow(version)
            bar.close()
            self.final_state = self._final_state(version)
            self.heldout_report = self._heldout_end(version)
            self.learning = report_learning(self.reward_history, self.component_history, self.run_dir, self.tracker)
            ended = "FINISHED"
        finally:
            self.tracker.close(ended)
            self.shutdown()
        summary = {**self._summary(time.perf_counter() - t_run), **self.final_state, "learning": self.learning,
                   "heldout": self.heldout_report}
        (self.run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _record(self, step: int, version: int, result: StepResult, pending: Optional[DispatchedStep]) -> None:
        """Metrics (MLflow and the console line), sample contact sheet and checkpoint (with the `pending`
        next step of async mode) after a step."""
        from tqdm import tqdm

        cfg = self.cfg
        m = step_metrics(result, list(cfg.rewards.weights))
        m["rewards/actor_restarts"] = float(self.rewards.restarts)
        m["rollout/worker_restarts"] = float(self.rollout.restarts)
        self.tracker.metrics(m, step=step)
        self.reward_history.append(m["reward/total/mean"])
        for comp in cfg.rewards.weights:
            self.component_history.setdefault(comp, []).append(m[f"reward/{comp}/mean"])
        tqdm.write(step_line(step, cfg.trainer.steps, m))
        if step % cfg.trainer.log_images_every == 0 and result.samples:
            first = result.samples[0]
            log_sample_sheet(self.run_dir / "grids" / f"step_{step:06d}.png", first.parsed, self.records[first.record],
                             self.vq, self.tracker)
        if step % cfg.trainer.checkpoint_every == 0 or step == cfg.trainer.steps:
            self._save(step, version, pending)

    def _grow(self, version: int) -> None:
        """Autoscale: start the rollout workers the cluster now has room for and bring them to
        `version` (the next dispatch uses them)."""
        before = len(self.rollout.workers)
        added = self.rollout.grow(version)
        if added:
            print(f"rollout pool: {before} -> {before + added} workers (new on "
                  f"{[r['node_ip'] for r in self.rollout.group.ready_reports[before:]]})")

    def _emit(self, event: str, step: int) -> None:
        for cb in self.callbacks:
            cb(event, step, self)

    def _final_state(self, version: int) -> Dict[str, Any]:
        """Where the actors ran and which policy version every rollout worker holds at the end
        (each must equal the learner's; None for a worker that cannot be reached now)."""
        return {"actor_nodes": self.actor_nodes(), "learner_version": version,
                "rollout_versions": self.rollout.worker_versions(),
                "rollout_workers_lost": self.rollout.lost_count, "rl_manifest": str(self.manifest),
                "rl_records": len(self.records), "sft_examples": self.sft_examples}

    def _collect(self, batch: RolloutBatch, version: int) -> CollectedRollout:
        """A dispatched generation, collected: its results, its seconds from dispatch to results,
        its guidance counters and the workers it ran on. A worker lost meanwhile is replaced and
        brought to `version`, or dropped (autoscale) and the weight group formed again without it."""
        results = self.rollout.collect(batch, version)
        generate_s = time.perf_counter() - batch.started
        guidance = self.rollout.guidance_since_last()  # the workers are idle until the next dispatch
        return CollectedRollout(results, generate_s, guidance, batch.worker_count, list(batch.lost_nodes))

    def _generate_now(self, prompts: List[List[int]], version: int, **how) -> List[Any]:
        """Generate on the rollout pool and wait (the held-out check)."""
        return self._collect(self.rollout.submit(prompts, **how), version).results

    def _heldout_end(self, version: int) -> Optional[Dict[str, Any]]:
        """The held-out check of the final policy; a failure is reported, not raised: the
        trained policy is saved by then."""
        if self.heldout is None:
            return None
        try:
            return self.heldout.at_end(functools.partial(self._generate_now, version=version), self.rewards,
                                       self.tracker, version)
        except Exception as exc:
            log.warning("the held-out check of the final policy failed: %s: %s", type(exc).__name__, exc)
            print(f"warning: held-out check failed ({type(exc).__name__}: {exc}); the trained policy is saved")
            return {"error": f"{type(exc).__name__}: {exc}"}

    def _summary(self, wall_s: float) -> Dict[str, Any]:
        h = self.reward_history
        k = max(1, len(h) // 5)
        return {"steps": len(h), "reward_history": h, "first_20pct_mean": float(np.mean(h[:k])) if h else None,
                "last_20pct_mean": float(np.mean(h[-k:])) if h else None, "wall_s": wall_s,
                "mlflow_uri": self.tracker.uri, "mlflow_run_id": self.tracker.run_id, "tracking": self.tracker.report()}

    def shutdown(self) -> None:
        for name in ("rollout", "rewards", "learner"):
            actor = getattr(self, name, None)
            if actor is not None:
                try:
                    actor.shutdown()
                except Exception:
                    pass
        if getattr(self, "placement", None) is not None:
            self.placement.remove()
