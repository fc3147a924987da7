"""The vLLM logits processor's time per decode step at batch 64, before and after the per-step
path lost its per-row host syncs, and the host syncs each makes per step.

"Before" is the code of commit 8365f65 (rollout/rules.py + rollout/vllm_processor.py, taken with
`git show` into a temporary module); "after" is the working tree's V1 processor (the V2 one runs
the same core). Same batch, same logits, same run: 64 rows = 24 guided samples at image codes +
their 24 twins, 4 guided samples at a forced newline (+ 4 twins), 4 text rows, 4 greedy-text rows,
4 unguided code rows. Vocabularies: the tiny policy's (17,152, one code range) and PURE's
(73,728, codes at 4..8195 and 65536..73727). Host syncs are counted on CPU as the calls that
would wait for a GPU: reading a tensor back (item, tolist, bool, int, float, numpy, cpu),
boolean-mask indexing (nonzero), and blocking host->device copies (`torch.tensor(list,
device=...)`, `.to(device)` without non_blocking).

    .venv/bin/python bench/processor_step.py [--threads N]
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from rollout.config import SamplingConfig  # noqa: E402
from rollout.rules import SpanRules  # noqa: E402
from vlcot.layout import TokenLayout  # noqa: E402

BASELINE = "8365f65"


def load_baseline():
    tmp = tempfile.mkdtemp()
    for name, dst in (("rules", "old_rules"), ("vllm_processor", "old_vllm_processor")):
        src = subprocess.run(["git", "-C", ROOT, "show", f"{BASELINE}:rollout/{name}.py"], check=True,
                             capture_output=True, text=True).stdout
        with open(os.path.join(tmp, dst + ".py"), "w") as f:
            f.write(src.replace("from rollout.rules import", "from old_rules import"))
    sys.path.insert(0, tmp)
    spec = importlib.util.spec_from_file_location("old_vllm_processor", os.path.join(tmp, "old_vllm_processor.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_vllm_processor"] = mod
    spec.loader.exec_module(mod)
    return mod


def layouts():
    tiny = TokenLayout(image_start=640, image_end=641, row_newline=642, grid_base=642, max_grid=64,
                       image_code_ids=tuple(range(708, 708 + 16384)))
    pure = TokenLayout(image_start=8197, image_end=8196, row_newline=8803, grid_base=8804, max_grid=64,
                       image_code_ids=tuple(range(4, 8196)) + tuple(range(65536, 73728)))
    return {"tiny (17,152)": (tiny, 17152, 640), "PURE (73,728)": (pure, 73728, 65536)}


def build(mod, layout, vocab, text_vocab):
    """A processor (module `mod`) holding the batch; returns (processor, logits)."""
    image = SimpleNamespace(hr_size=512)
    rules = SpanRules.build(layout, image, SamplingConfig(), vocab, text_vocab)
    greedy = SpanRules.build(layout, image, SamplingConfig(text_greedy=True), vocab, text_vocab)
    proc = mod.VLCoTLogitsProcessor(None, torch.device("cpu"), False)
    code = layout.image_code_ids[0]
    span_codes = [layout.image_start, rules.grid_base + 4, rules.grid_base + 4] + [code] * 10  # inside row 0
    at_newline = [layout.image_start, rules.grid_base + 4, rules.grid_base + 4] + [code] * 16
    prompt = [1, layout.image_start, rules.grid_base + 1, rules.grid_base + 1] + [code] * 4 + [layout.image_end, 5]
    added, index = [], 0

    def params(rj, extra=None, temperature=0.9):
        e = {mod.RULES_KEY: rj}
        e.update(extra or {})
        return SimpleNamespace(temperature=temperature, top_p=1.0, extra_args=e)

    rj, gj = rules.to_json(), greedy.to_json()
    for k in range(28):  # guided samples and their twins
        out = list(span_codes if k < 24 else at_newline)
        uid = f"s{k}"
        added.append((index, params(rj, {mod.GUIDE_KEY: {"uid": uid, "scale": 0.8, "seed": k}}), prompt, out))
        twin = SimpleNamespace(temperature=0.0, top_p=1.0,
                               extra_args={mod.TWIN_KEY: {"uid": uid, "end": layout.image_end}})
        added.append((index + 1, twin, [layout.image_start], out[1:]))
        index += 2
    for k in range(4):
        added.append((index, params(rj), prompt, [7, 8]))
        added.append((index + 1, params(gj), prompt, [7, 8]))
        added.append((index + 2, params(rj), prompt, list(span_codes)))
        index += 3
    proc.update_state(SimpleNamespace(added=added, removed=[], moved=[]))
    g = torch.Generator().manual_seed(0)
    # code logits of varied entropy (k from tens to ~2000), text logits around them
    logits = torch.randn(index, vocab, generator=g) * torch.linspace(0.5, 6.0, index)[:, None]
    return proc, logits


class SyncCounter:
    """Counts, while active, the calls that would make the host wait for a GPU."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu")

    def __init__(self):
        self.count, self.saved = 0, {}

    def __enter__(self):
        for name in self.NAMES:
            self._wrap(torch.Tensor, name)
        orig_getitem = torch.Tensor.__getitem__
        self.saved[(torch.Tensor, "__getitem__")] = orig_getitem

        def getitem(t, idx):
            items = idx if isinstance(idx, tuple) else (idx,)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items):
                self.count += 1  # boolean-mask indexing: nonzero, a sync on CUDA
            return orig_getitem(t, idx)

        torch.Tensor.__getitem__ = getitem
        orig_tensor = torch.tensor
        self.saved[(torch, "tensor")] = orig_tensor

        def tensor(*a, **k):
            if k.get("device") is not None:
                self.count += 1  # a blocking host->device copy on CUDA
            return orig_tensor(*a, **k)

        torch.tensor = tensor
        orig_to = torch.Tensor.to
        self.saved[(torch.Tensor, "to")] = orig_to

        def to(t, *a, **k):
            if (a and isinstance(a[0], (torch.device, str))) or "device" in k:
                if not k.get("non_blocking", False):
                    self.count += 1
            return orig_to(t, *a, **k)

        torch.Tensor.to = to
        return self

    def _wrap(self, owner, name):
        orig = getattr(owner, name)
        self.saved[(owner, name)] = orig

        def wrapped(*a, **k):
            self.count += 1
            return orig(*a, **k)

        setattr(owner, name, wrapped)

    def __exit__(self, *exc):
        for (owner, name), orig in self.saved.items():
            setattr(owner, name, orig)


def time_step(mod, layout, vocab, text_vocab, repeat: int):
    proc, logits = build(mod, layout, vocab, text_vocab)
    state = {i: (r.state.__dict__.copy() if hasattr(r, "state") else None) for i, r in proc.rows.items()}

    def reset():  # the same step every time: states and generators back where they were
        for i, r in proc.rows.items():
            if state[i] is not None:
                r.state.__dict__.update(state[i])
                if r.guide is not None:
                    r.guide.generator.manual_seed(int(r.guide.uid[1:]))

    reset()
    out = proc.apply(logits.clone())
    reset()
    with SyncCounter() as sc:
        proc.apply(logits.clone())
    best = float("inf")
    for _ in range(repeat):
        reset()
        x = logits.clone()
        t0 = time.perf_counter()
        proc.apply(x)
        best = min(best, time.perf_counter() - t0)
    return best, sc.count, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    old = load_baseline()
    import rollout.vllm_processor as new

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 64")
    for name, (layout, vocab, text_vocab) in layouts().items():
        t_old, s_old, o_old = time_step(old, layout, vocab, text_vocab, args.repeat)
        t_new, s_new, o_new = time_step(new, layout, vocab, text_vocab, args.repeat)
        same = torch.equal(o_old, o_new)
        print(f"{name}: before {t_old * 1e3:.2f} ms/step, {s_old} host syncs; after {t_new * 1e3:.2f} ms/step, "
              f"{s_new} host syncs; {t_old / t_new:.2f}x less time; outputs identical: {same}")


if __name__ == "__main__":
    main()
