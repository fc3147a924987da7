"""The conversation format: how a prompt is wrapped around the LR image and how a response ends.

A prompt is

    BOS + user_prefix + instruction (its `<|image|>` replaced by the LR image span)
        + turn_separator + assistant_prefix

and a response is the VLCoT trace followed by `end_token`; generation stops at `end_token`.
Role words are plain text; `turn_separator` and `end_token` are single vocabulary tokens
(named by their token string, resolved against the policy's tokenizer).

Presets:
- `realsr`: this project's own format (the tiny demo policy): an instruction naming the five
  degradation items, "Assistant: " as the only role word, `</s>` as the end token.
- `lumina`: the released PURE / Lumina-mGPT / RealSR-R1 format: no role words, the RealSR-R1
  RL prompt verbatim, `<reserved08706>` (id 8710) both between the turns and at the end.

`ConversationConfig` (in `policy.conversation`) picks a preset and may override any field;
`preset: auto` takes the preset a checkpoint names in its config.json (`import-policy`
writes `lumina`), else `realsr`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

IMAGE_PLACEHOLDER = "<|image|>"
CHECKPOINT_KEY = "realsr_conversation"  # config.json: the preset a checkpoint was trained in


@dataclass(frozen=True)
class Conversation:
    name: str
    instruction: str  # the user turn; IMAGE_PLACEHOLDER marks where the LR image span goes
    user_prefix: str = ""  # role words before the user turn
    assistant_prefix: str = ""  # role words that open the response (the prompt ends with them)
    turn_separator: str = ""  # one vocabulary token between user turn and response; "" = none
    end_token: str = "</s>"  # one vocabulary token that ends the response

    def __post_init__(self):
        if self.instruction.count(IMAGE_PLACEHOLDER) != 1:
            raise ValueError(f"conversation {self.name!r}: the instruction must hold {IMAGE_PLACEHOLDER} exactly once, "
                             f"found {self.instruction.count(IMAGE_PLACEHOLDER)}")
        if not self.end_token:
            raise ValueError(f"conversation {self.name!r}: end_token must name a vocabulary token")

    def split_instruction(self):
        """(text before the image, text after it)."""
        before, after = self.instruction.split(IMAGE_PLACEHOLDER)
        return before, after


_REALSR_INSTRUCTION = (
    "Here is a low-resolution image with unknown real-world degradation:\n"
    + IMAGE_PLACEHOLDER
    + "\nRestore it to high resolution, reasoning first. Perceive the degradation and name it in "
    "<degradation></degradation> as five items: blur level, resize, noise level, compression "
    "level, final resize. Then understand the content and restore it step by step from coarse "
    "to fine: <rough_understand></rough_understand> then <rough_image></rough_image> at a "
    "quarter of the target resolution, <middle_understand></middle_understand> then "
    "<middle_image></middle_image> at half, <final_understand></final_understand> then "
    "<final_image></final_image> at full resolution.\n"
)

# RealSR-R1's `make_conversation` prompt, verbatim (../shared/REAL-CHECKPOINT.md).
_LUMINA_INSTRUCTION = (
    "Perceive the degradation, understand the image content, and restore the high-quality image step by step "
    "(simulating the image restoration process from coarse to fine). The low-quality image is as follows: "
    + IMAGE_PLACEHOLDER
    + ". The generation format should be as follows: <degradation> ... </degradation> <rough_understand> ... "
    "</rough_understand> <rough_image> ... </rough_image> <middle_understand> ... </middle_understand> "
    "<middle_image> ... </middle_image> <final_understand> ... </final_understand> <final_image> ... </final_image>"
)

PRESETS = {
    "realsr": Conversation(name="realsr", instruction=_REALSR_INSTRUCTION, assistant_prefix="Assistant: ",
                           end_token="</s>"),
    "lumina": Conversation(name="lumina", instruction=_LUMINA_INSTRUCTION, turn_separator="<reserved08706>",
                           end_token="<reserved08706>"),
}
DEFAULT_PRESET = "realsr"


@dataclass
class ConversationConfig:
    """`policy.conversation`: a preset (auto | realsr | lumina) and optional per-field overrides
    (null = the preset's value)."""

    preset: str = "auto"  # auto = the preset the checkpoint's config.json names, else realsr
    instruction: Optional[str] = None  # must contain <|image|> once
    user_prefix: Optional[str] = None
    assistant_prefix: Optional[str] = None
    turn_separator: Optional[str] = None  # a token string, "" for none
    end_token: Optional[str] = None  # a token string


def preset_names():
    return ["auto"] + list(PRESETS)


def resolve_conversation(cfg: Optional[ConversationConfig], checkpoint_preset: Optional[str] = None) -> Conversation:
    """The format a run uses: the configured preset (or, for `auto`, the checkpoint's), with
    the configured overrides applied. Unknown names and bad overrides raise ValueError."""
    cfg = cfg or ConversationConfig()
    name = cfg.preset
    if name == "auto":
        name = checkpoint_preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise ValueError(f"conversation preset {name!r} not in {preset_names()}")
    overrides = {f.name: getattr(cfg, f.name) for f in fields(cfg)
                 if f.name != "preset" and getattr(cfg, f.name) is not None}
    return replace(PRESETS[name], **overrides) if overrides else PRESETS[name]


def conversation_problems(cfg: ConversationConfig, key: str = "policy.conversation"):
    """(key, message) pairs for config validation."""
    try:
        resolve_conversation(cfg)
    except ValueError as exc:
        return [(f"{key}.preset" if "preset" in str(exc) else key, str(exc))]
    return []
