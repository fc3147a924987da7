"""Text tokenizers: a small byte-level BPE built offline for the tiny policy, and the codec
that lets trace code talk to any HF tokenizer (the tiny one or a real Chameleon one).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Iterable, List, Sequence

from vlcot.layout import TokenLayout
from vlcot.trace import LEVELS, PROMPT_PREFIX, PROMPT_SUFFIX, RESIZES, STAGES, degradation_text

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
TAG_TOKENS = [f"<{s}>" for s in STAGES] + [f"</{s}>" for s in STAGES]

ANNOTATIONS = Path(__file__).parent / "builtin" / "annotations.json"


def builtin_corpus() -> List[str]:
    """Everything the tiny tokenizer must represent compactly: prompt, tags, degradation
    sentences and the built-in captions. Any other text still encodes (byte-level)."""
    texts = [PROMPT_PREFIX, PROMPT_SUFFIX]
    for blur, noise, jpeg in itertools.product(LEVELS, LEVELS, LEVELS):
        for r1, r2 in itertools.product(RESIZES, RESIZES):
            texts.append(degradation_text([blur, r1, noise, jpeg, r2]))
    ann = json.loads(ANNOTATIONS.read_text())
    for key, item in ann.items():
        if key.startswith("_"):
            continue
        texts += list(item["captions"].values()) + [" ".join(item["tags"])]
    return texts


def train_bpe_tokenizer(vocab_size: int, corpus: Iterable[str] | None = None):
    """A byte-level BPE (HF `PreTrainedTokenizerFast`) trained on `corpus` (default: the
    built-in corpus). Special tokens and the 14 stage tags are single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, UNK] + TAG_TOKENS
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus if corpus is not None else builtin_corpus()), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )
    return fast


class HFTextCodec:
    """`vlcot.trace.TextCodec` over an HF tokenizer; image-span ids are never text."""

    def __init__(self, tokenizer, layout: TokenLayout):
        self.tokenizer = tokenizer
        self.layout = layout
        self.bos_token_id = int(tokenizer.bos_token_id)
        self.eos_token_id = int(tokenizer.eos_token_id)
        self._n = len(tokenizer)
        self._not_text = {layout.image_start, layout.image_end, layout.row_newline}
        self._not_text.update(range(layout.grid_base + 1, layout.grid_base + layout.max_grid + 1))

    def encode_text(self, text: str) -> List[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def is_text_token(self, token_id: int) -> bool:
        t = int(token_id)
        return (
            0 <= t < self._n
            and t not in self._not_text
            and t not in (self.bos_token_id, self.eos_token_id)
            and not bool(self.layout.is_image_code([t])[0])
        )
