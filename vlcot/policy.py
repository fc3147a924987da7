"""The policy: a Chameleon-family model whose image logits are NOT masked.

Stock `ChameleonForConditionalGeneration` sets every image-token logit to -inf (Chameleon
was released without image generation). RealSR-R1's policy must write image tokens, so
`UnmaskedChameleonForConditionalGeneration` computes the same logits without that mask;
weights and config stay in the stock HF layout (loadable by transformers and vLLM).

A checkpoint directory holds config.json + safetensors + the text tokenizer. Ours (and
released ones after `realsr-r1 import-policy`) carry their image-token layout in config.json
(`realsr_token_layout`) and name their conversation preset (`realsr_conversation`); a folder
without the layout gets it from `PolicyConfig.special_tokens` plus the `IMGIMG...Z` names in
its `vocabulary_map`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict

import torch
from transformers import AutoTokenizer, ChameleonConfig, ChameleonForConditionalGeneration
from transformers.modeling_outputs import CausalLMOutputWithPast

from vlcot.config import STOCK_ARCHITECTURE, ImageConfig, PolicyConfig, VQConfig, policy_folder_problem
from vlcot.errors import BadPath
from vlcot.conversation import CHECKPOINT_KEY, Conversation, resolve_conversation
from vlcot.layout import TokenLayout, image_code_name
from vlcot.text_tokenizer import HFTextCodec, train_bpe_tokenizer

LAYOUT_KEY = "realsr_token_layout"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Chameleon's own VQGAN is part of the architecture but never run by this policy (it reads
# LlamaGen codes as tokens): built tiny and frozen, so both engines load it at no cost.
MINIMAL_CHAMELEON_VQ = dict(embed_dim=8, num_embeddings=16, latent_channels=8, base_channels=32,
                            channel_multiplier=[1], num_res_blocks=1, resolution=32, attn_resolutions=[])


class UnmaskedChameleonForConditionalGeneration(ChameleonForConditionalGeneration):
    """Chameleon with image-token logits left as computed (the policy writes images)."""

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs[0]
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


def freeze_unused(model) -> None:
    """Chameleon carries its own VQGAN (`model.model.vqmodel`); the policy reads LlamaGen
    codes as tokens and never runs it, so it is frozen (no optimizer state, no gradient)."""
    vq = getattr(getattr(model, "model", None), "vqmodel", None)
    if vq is not None:
        for p in vq.parameters():
            p.requires_grad_(False)


@dataclass
class PolicyFormat:
    """How a policy reads and writes: its tokenizer, image-token layout and conversation format."""

    tokenizer: Any
    layout: TokenLayout
    conversation: Conversation

    @property
    def codec(self) -> HFTextCodec:
        return HFTextCodec(self.tokenizer, self.layout, self.conversation)


@dataclass
class PolicyMeta(PolicyFormat):
    """What a checkpoint says about itself, without its weights."""

    config: ChameleonConfig


@dataclass
class Policy(PolicyFormat):
    model: UnmaskedChameleonForConditionalGeneration

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        self.model.config.architectures = [STOCK_ARCHITECTURE]  # save_pretrained set it to our class name
        # save_pretrained records the Python class name; keep the stock architecture name
        # so transformers' Auto classes, vLLM registries and PURE tooling recognise it.
        cfg_file = path / "config.json"
        raw = json.loads(cfg_file.read_text())
        raw["architectures"] = [STOCK_ARCHITECTURE]
        raw[CHECKPOINT_KEY] = self.conversation.name
        cfg_file.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        self.tokenizer.save_pretrained(path)
        return path


def _layout_dict(layout: TokenLayout) -> Dict[str, int]:
    return {
        "image_start": layout.image_start,
        "image_end": layout.image_end,
        "row_newline": layout.row_newline,
        "grid_base": layout.grid_base,
        "max_grid": layout.max_grid,
        "patch_px": layout.patch_px,
        "downsample": layout.downsample,
        "codebook_size": layout.codebook_size,
    }


def _layout_from_config(config: ChameleonConfig, policy_cfg: PolicyConfig, image: ImageConfig,
                        vq: VQConfig) -> TokenLayout:
    stored = getattr(config, LAYOUT_KEY, None)
    if stored:
        spec = dict(stored)
    else:
        spec = asdict(policy_cfg.special_tokens)
        spec.update(patch_px=image.patch_px, downsample=8, codebook_size=vq.codebook_size)
    if not config.vocabulary_map:
        raise ValueError("checkpoint config.json has no vocabulary_map: cannot find the image-code tokens")
    return TokenLayout.from_vocabulary_map(config.vocabulary_map, **spec)


def build_tiny_policy(policy_cfg: PolicyConfig, image: ImageConfig, vq: VQConfig) -> Policy:
    """A random Chameleon of `policy_cfg.model` sizes with the full image-code vocabulary.

    Vocabulary: [BPE text tokens | image_start, image_end, row_newline | grid 1..max_grid |
    <image> | IMGIMG codes 0..codebook_size-1], rounded up to a multiple of 64.
    """
    m = policy_cfg.model
    tokenizer = train_bpe_tokenizer(m.text_vocab_size)
    vocab_map: Dict[str, int] = dict(tokenizer.get_vocab())
    n_text = len(tokenizer)
    max_grid = policy_cfg.special_tokens.max_grid
    names = ["<image_start>", "<image_end>", "<row_newline>"] + [f"<grid_{n}>" for n in range(1, max_grid + 1)]
    names += ["<image>"]
    for i, name in enumerate(names):
        vocab_map[name] = n_text + i
    code_base = n_text + len(names)
    for c in range(vq.codebook_size):
        vocab_map[image_code_name(c)] = code_base + c
    vocab_size = -(-(code_base + vq.codebook_size) // 64) * 64
    layout = TokenLayout(
        image_start=n_text, image_end=n_text + 1, row_newline=n_text + 2, grid_base=n_text + 2,
        max_grid=max_grid, image_code_ids=tuple(range(code_base, code_base + vq.codebook_size)),
        patch_px=image.patch_px, downsample=8,
    )
    head_dim = m.hidden_size // m.num_attention_heads
    config = ChameleonConfig(
        vocab_size=vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads,
        max_position_embeddings=m.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        vocabulary_map=vocab_map,
        # Chameleon's own VQGAN is part of the architecture but unused here (the policy reads
        # LlamaGen codes as tokens): keep it minimal.
        vq_config=MINIMAL_CHAMELEON_VQ,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    setattr(config, LAYOUT_KEY, _layout_dict(layout))
    config.architectures = [STOCK_ARCHITECTURE]
    assert head_dim * m.num_attention_heads == m.hidden_size, "hidden_size must divide by heads"
    torch.manual_seed(m.seed)
    model = UnmaskedChameleonForConditionalGeneration(config).to(_DTYPES[policy_cfg.dtype])
    freeze_unused(model)
    model.eval()
    return Policy(model=model, tokenizer=tokenizer, layout=layout,
                  conversation=resolve_conversation(policy_cfg.conversation))


def _read_config(path: Path) -> ChameleonConfig:
    """The folder's config, once `policy_folder_problem` finds nothing wrong with the folder
    (a BadPath naming what is, before transformers gets to it)."""
    why = policy_folder_problem(path)
    if why:
        raise BadPath(f"policy checkpoint {why}")
    return ChameleonConfig.from_pretrained(path)


def load_policy_meta(path: str | Path, policy_cfg: PolicyConfig | None = None, image: ImageConfig | None = None,
                     vq: VQConfig | None = None) -> PolicyMeta:
    """A checkpoint's config, tokenizer, token layout and conversation format, without building
    the model (cheap; and safe in a process where vLLM has patched the transformers classes)."""
    path = Path(path)
    policy_cfg = policy_cfg or PolicyConfig()
    config = _read_config(path)
    layout = _layout_from_config(config, policy_cfg, image or ImageConfig(), vq or VQConfig())
    conversation = resolve_conversation(policy_cfg.conversation, getattr(config, CHECKPOINT_KEY, None))
    return PolicyMeta(tokenizer=AutoTokenizer.from_pretrained(path, local_files_only=True), layout=layout,
                      conversation=conversation, config=config)


def load_policy(path: str | Path, policy_cfg: PolicyConfig | None = None, image: ImageConfig | None = None,
                vq: VQConfig | None = None, dtype: torch.dtype | None = None) -> Policy:
    """Load a local HF-layout Chameleon-family checkpoint (ours, or a released one after
    `import-policy`) in `dtype` (default `policy_cfg.dtype`): weights are read in that dtype,
    never as an fp32 copy first."""
    path = Path(path)
    policy_cfg = policy_cfg or PolicyConfig()
    meta = load_policy_meta(path, policy_cfg, image, vq)
    model = UnmaskedChameleonForConditionalGeneration.from_pretrained(
        path, config=meta.config, dtype=dtype or _DTYPES[policy_cfg.dtype], local_files_only=True
    )
    freeze_unused(model)
    model.eval()
    return Policy(model=model, tokenizer=meta.tokenizer, layout=meta.layout, conversation=meta.conversation)


def policy_from_config(policy_cfg: PolicyConfig, image: ImageConfig, vq: VQConfig) -> Policy:
    if policy_cfg.checkpoint:
        return load_policy(policy_cfg.checkpoint, policy_cfg, image, vq)
    return build_tiny_policy(policy_cfg, image, vq)
