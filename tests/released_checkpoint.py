"""The released-layout checkpoint fixture (vlcot/released_layout.py writes it) and the
reference weights the import tests compare against."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import torch

from vlcot.released_layout import (CODES, FIRST_CODES, HIGH_BASE, RESERVED_TOP, TEXT_BASE, VOCAB,  # noqa: F401
                                   released_vocabulary, write_released_checkpoint)


def reference_state_dict(folder: str | Path) -> Dict[str, torch.Tensor]:
    """The fixture's weights with every `[1, head_dim]` norm repeated over the heads by hand."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    sd: Dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    heads = config["num_attention_heads"]
    for k in list(sd):
        if ("q_norm" in k or "k_norm" in k) and sd[k].shape[0] == 1:
            sd[k] = torch.cat([sd[k]] * heads, dim=0)
    return sd
