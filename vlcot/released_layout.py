"""A checkpoint written exactly in the released PURE / Lumina-mGPT layout, at any width.

The rehearsal of the published run (configs/paper-shape-cpu.yaml, `policy.init:
released-layout`) starts from one written here and converted by the real importer, so the
import path, the 73,728-entry vocabulary and the lumina conversation run as they will for the
released PURE-7B; the tests use it as their released-checkpoint fixture.

What makes it "released" (../shared/REAL-CHECKPOINT.md):
- config.json: `ChameleonXLLMXForConditionalGeneration`, model_type chameleon, qk-layernorm,
  `max_position_embeddings` set, Chameleon's own `vocabulary_map` (8,192 codes only);
- safetensors shards + `model.safetensors.index.json`, q/k norms saved `[1, head_dim]`, no
  `model.vqmodel.*` tensors, bf16;
- `text_tokenizer.json` shaped like PURE's: a `tokenizers` BPE whose vocabulary names 16,384
  image codes (`IMGIMG...Z`) on ids 4-8195 and 65536-73727, `<s>` 0, `<pad>` 1, `</s>` 2,
  `<eoss>` 8196, `<racm3:break>` 8197, `<reservedNNNNN>` = id NNNNN + 4 (so `<reserved08706>`
  is 8710), text tokens after the reserved block.

The weights are random (seeded); the text tokenizer is the project's tiny byte-level BPE
placed at id 9000 and up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import save_file

from vlcot.layout import image_code_name
from vlcot.text_tokenizer import BOS, EOS, PAD, TAG_TOKENS, UNK, train_bpe_tokenizer

CODES = 16384
FIRST_CODES = 8192  # ids 4 .. 8195
HIGH_BASE = 65536  # codes 8192.. on ids 65536 ..
VOCAB = HIGH_BASE + CODES - FIRST_CODES  # 73,728
TEXT_BASE = 9000
RESERVED_TOP = 8900  # <reserved08194> (id 8198) .. <reserved08895> (id 8899)


def released_vocabulary(text_vocab: Dict[str, int]) -> Dict[str, int]:
    """name -> id over all 73,728 ids; `text_vocab` (a byte-level BPE's own vocab) is placed at TEXT_BASE."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<eoss>": 8196, "<racm3:break>": 8197}
    for c in range(FIRST_CODES):
        vocab[image_code_name(c)] = 4 + c
    for c in range(FIRST_CODES, CODES):
        vocab[image_code_name(c)] = HIGH_BASE + c - FIRST_CODES
    for tid in range(8198, RESERVED_TOP):
        vocab[f"<reserved{tid - 4:05d}>"] = tid
    vocab["<image>"] = RESERVED_TOP
    for name, tid in sorted(text_vocab.items(), key=lambda kv: kv[1]):
        if name not in vocab:
            vocab[name] = TEXT_BASE + tid
    used = set(vocab.values())
    for i in range(VOCAB):
        if i not in used:
            vocab[f"<unused{i}>"] = i
    assert len(set(vocab.values())) == len(vocab) == VOCAB and vocab["<reserved08706>"] == 8710
    return vocab


def _text_tokenizer_json() -> dict:
    """A PURE-shaped `text_tokenizer.json`: the tiny byte-level BPE's merges over the full id space."""
    bpe = json.loads(train_bpe_tokenizer(640).backend_tokenizer.to_str())
    ours = {PAD, BOS, EOS, UNK, *TAG_TOKENS}  # the tiny tokenizer's specials: plain text in Chameleon's
    text_vocab = {k: v for k, v in bpe["model"]["vocab"].items() if k not in ours}
    vocab = released_vocabulary(text_vocab)
    bpe["model"]["vocab"] = vocab
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<eoss>", "<racm3:break>", "<image>"]
    specials += [n for n in vocab if n.startswith("<reserved")]
    bpe["added_tokens"] = [{"id": vocab[n], "content": n, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True} for n in specials]
    bpe["post_processor"] = None
    return bpe


def write_released_checkpoint(out: str | Path, *, hidden: int = 64, heads: int = 2, layers: int = 2,
                              intermediate: int = 176, shards: int = 2, seed: int = 0,
                              max_position_embeddings: int = 11776, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the fixture into `out` (created) and return it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = _text_tokenizer_json()
    (out / "text_tokenizer.json").write_text(json.dumps(tok))
    chameleon_map = {n: i for n, i in tok["model"]["vocab"].items() if i < 8900 or n.startswith("<")}
    chameleon_map = {n: i for n, i in chameleon_map.items() if not (n.startswith("IMGIMG") and i >= HIGH_BASE)}
    config = {
        "architectures": ["ChameleonXLLMXForConditionalGeneration"], "model_type": "chameleon",
        "vocab_size": VOCAB, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
        "max_position_embeddings": max_position_embeddings, "rms_norm_eps": 1e-5, "qk_layernorm": True,
        "swin_norm": False, "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2,
        "rope_theta": 10000.0, "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False,
        "torch_dtype": str(dtype).replace("torch.", ""), "vocabulary_map": chameleon_map,
        "transformers_version": "4.44.0",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    state = _random_state(config, seed, dtype)
    names = sorted(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        fname = f"consolidated-{i:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in part}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return out


def _random_state(config: dict, seed: int, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, v, inter = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    hd = h // config["num_attention_heads"]

    def w(*shape, scale=0.05):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    def norm(n):  # non-trivial weights and biases, so a wrong repeat or a re-initialisation shows
        return (1.0 + 0.2 * torch.randn(1, n, generator=g)).to(dtype), (0.1 * torch.randn(1, n, generator=g)).to(dtype)

    sd = {"model.embed_tokens.weight": w(v, h, scale=0.5), "lm_head.weight": w(v, h),
          "model.norm.weight": (1 + 0.1 * torch.randn(h, generator=g)).to(dtype)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{proj}.weight"] = w(h, h)
        for n in ("q_norm", "k_norm"):
            sd[p + f"self_attn.{n}.weight"], sd[p + f"self_attn.{n}.bias"] = norm(hd)
        sd[p + "mlp.gate_proj.weight"] = w(inter, h)
        sd[p + "mlp.up_proj.weight"] = w(inter, h)
        sd[p + "mlp.down_proj.weight"] = w(h, inter)
        sd[p + "input_layernorm.weight"] = (1 + 0.1 * torch.randn(h, generator=g)).to(dtype)
        sd[p + "post_attention_layernorm.weight"] = (1 + 0.1 * torch.randn(h, generator=g)).to(dtype)
    return sd
