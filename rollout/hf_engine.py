"""The HF transformers engine: the reference for the vLLM engine, and the engine that can do
classifier-free guidance.

Each prompt's G samples decode together (same prompt, no padding) with a KV cache. With
`cfg_scale != 1`, image-code logits become uncond + s * (cond - uncond) (s = 0.8 gives the
published 0.8 cond + 0.2 uncond), where the unconditional branch sees only the tokens since
the current image start (its own KV cache per sample, restarted at every image; a prompt that
ends inside an image span starts it from that span's tokens).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch

from rollout.config import RolloutConfig
from rollout.engine import RolloutEngine, Sample
from rollout.rules import Masks, SpanRules, constrain_row, initial_state, open_span, sample_row
from vlcot.policy import load_policy


class HFEngine(RolloutEngine):
    def __init__(self, cfg: RolloutConfig, policy_dir: str, image_cfg, policy_cfg=None, device: str = "cpu"):
        policy = load_policy(policy_dir, policy_cfg, image_cfg)
        self.model = policy.model.to(device).eval()
        self.device = torch.device(device)
        rules = SpanRules.build(policy.layout, image_cfg, cfg.sampling, self.model.config.vocab_size,
                                len(policy.tokenizer), policy.codec)
        super().__init__(cfg, rules, policy.layout, policy.codec.end_token_id)
        self.masks = Masks(rules, self.device)
        self.pad_id = int(policy.tokenizer.pad_token_id or 0)

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]], version: int) -> int:
        params = dict(self.model.named_parameters())
        n = 0
        for name, t in named_tensors:
            if name not in params:
                raise KeyError(f"weight {name!r} is not a parameter of the policy")
            params[name].copy_(t.to(params[name].device, params[name].dtype))
            n += 1
        self.version = version
        return n

    def get_parameter(self, name: str) -> Optional[torch.Tensor]:
        p = dict(self.model.named_parameters()).get(name)
        return None if p is None else p.detach().cpu().clone()

    def checkpoint_view(self) -> Dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters()}

    @torch.no_grad()
    def prompt_logprobs(self, sequences: List[List[int]]) -> List[List[float]]:
        """Teacher-forced log-probs of tokens 1..L-1 of each sequence (full forward)."""
        out = []
        for seq in sequences:
            ids = torch.tensor([seq], device=self.device)
            logp = torch.log_softmax(self.model(input_ids=ids).logits[0, :-1].float(), -1)
            out.append(logp.gather(-1, ids[0, 1:, None]).squeeze(-1).tolist())
        return out

    def _uncond_logits(self, tokens: List[int], state: dict) -> torch.Tensor:
        """Advance one sample's unconditional branch by `tokens`; returns its next logits."""
        out = self.model(input_ids=torch.tensor([tokens], device=self.device), past_key_values=state.get("cache"),
                         use_cache=True)
        state["cache"] = out.past_key_values
        return out.logits[0, -1].float()

    @torch.no_grad()
    def _generate(self, prompts: List[List[int]], n: int, seed: int, greedy: bool) -> List[List[Sample]]:
        s = self.cfg.sampling
        gen = torch.Generator(device="cpu").manual_seed(seed)
        results = []
        for p in prompts:
            results.append(self._generate_group(p, n, gen, greedy or s.temperature == 0))
        return results

    def _generate_group(self, prompt: List[int], n: int, gen: torch.Generator, greedy: bool) -> List[Sample]:
        s = self.cfg.sampling
        cfg_on = s.cfg_scale != 1.0
        ids = torch.tensor([prompt] * n, device=self.device)
        out = self.model(input_ids=ids, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1].float()
        states = [initial_state(prompt, self.rules) for _ in range(n)]
        uncond: List[dict] = [{} for _ in range(n)]
        tail = open_span(prompt, states[0]) if cfg_on else []
        uncond_logits: List[Optional[torch.Tensor]] = [self._uncond_logits(tail, u) if tail else None for u in uncond]
        self.throughput.add_guidance(n if tail else 0, 0)
        tokens: List[List[int]] = [[] for _ in range(n)]
        logps: List[List[float]] = [[] for _ in range(n)]
        done = [False] * n
        reason = ["length"] * n
        for _ in range(self.max_new_tokens):
            raw_logp = torch.log_softmax(logits, dim=-1)
            nxt = torch.full((n,), self.pad_id, dtype=torch.long)
            for i in range(n):
                if done[i]:
                    continue
                row = logits[i].clone()
                guided = None
                if cfg_on and uncond_logits[i] is not None and states[i].next_kind(self.rules)[0] == "codes":
                    guided = uncond_logits[i] + s.cfg_scale * (logits[i] - uncond_logits[i])
                constrain_row(row, states[i], self.rules, self.masks, guided)
                tok = sample_row(row, 0.0 if greedy else s.temperature, s.top_p, gen)
                nxt[i] = tok
                tokens[i].append(tok)
                logps[i].append(float(raw_logp[i, tok]))
                states[i].feed(tok, self.rules)
                if cfg_on:
                    if states[i].span_len == 1:  # an image starts: a fresh unconditional context
                        uncond[i] = {}
                        self.throughput.add_guidance(1, 0)
                    uncond_logits[i] = self._uncond_logits([tok], uncond[i]) if states[i].span_len else None
                if tok == self.end_token_id:
                    done[i], reason[i] = True, "stop"
            if all(done):
                break
            out = self.model(input_ids=nxt[:, None].to(self.device), past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1].float()
        return [Sample(0, i, tokens[i], logps[i], reason[i], self.version) for i in range(n)]
