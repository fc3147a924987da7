"""Text tokenizers: a small byte-level BPE built offline for the tiny policy, and the codec
that lets trace code talk to any HF tokenizer (the tiny one or a real Chameleon one).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Iterable, List, Sequence

from vlcot.conversation import PRESETS, Conversation
from vlcot.layout import TokenLayout
from vlcot.trace import LEVELS, RESIZES, STAGES, degradation_text

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
TAG_TOKENS = [f"<{s}>" for s in STAGES] + [f"</{s}>" for s in STAGES]

ANNOTATIONS = Path(__file__).parent / "builtin" / "annotations.json"


def builtin_corpus() -> List[str]:
    """Everything the tiny tokenizer must represent compactly: the `realsr` conversation's
    prompt, tags, degradation sentences and the built-in captions. Any other text still
    encodes (byte-level)."""
    conv = PRESETS["realsr"]
    texts = [*conv.split_instruction(), conv.assistant_prefix]
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
    """`vlcot.trace.TextCodec` over an HF tokenizer in one conversation format; image-span ids,
    BOS and the conversation's separator and end tokens are never text."""

    def __init__(self, tokenizer, layout: TokenLayout, conversation: Conversation):
        self.tokenizer = tokenizer
        self.layout = layout
        self.conversation = conversation
        if tokenizer.bos_token_id is None:
            raise ValueError("the policy's tokenizer has no BOS token")
        self.bos_token_id = int(tokenizer.bos_token_id)
        self.end_token_id = self.token_id(conversation.end_token, "end_token")
        self.separator_ids = ([self.token_id(conversation.turn_separator, "turn_separator")]
                              if conversation.turn_separator else [])
        self._n = len(tokenizer)
        self._not_text = {layout.image_start, layout.image_end, layout.row_newline, self.bos_token_id,
                          self.end_token_id, *self.separator_ids}
        self._not_text.update(range(layout.grid_base + 1, layout.grid_base + layout.max_grid + 1))
        before, after = conversation.split_instruction()
        self._prompt_head = [self.bos_token_id] + self.encode_text(conversation.user_prefix + before)
        self._prompt_tail = self.encode_text(after) + self.separator_ids + self.encode_text(conversation.assistant_prefix)

    def token_id(self, token: str, what: str) -> int:
        """The id of one vocabulary token named by its string; a clear error when it is not one."""
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token:
            raise ValueError(f"conversation {self.conversation.name!r}: {what} {token!r} is not a token of the "
                             f"policy's vocabulary (policy.conversation.{what})")
        return int(tid)

    def prompt_around(self, image_span: List[int]) -> List[int]:
        return self._prompt_head + list(image_span) + self._prompt_tail

    def encode_text(self, text: str) -> List[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def is_text_token(self, token_id: int) -> bool:
        t = int(token_id)
        return 0 <= t < self._n and t not in self._not_text and not bool(self.layout.is_image_code([t])[0])
