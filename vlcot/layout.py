"""Where image tokens live in the policy's vocabulary, and the image span format.

An image span is

    image_start, height_grid, width_grid, (code * w, row_newline) * h, image_end

where the grid tokens count `patch_px`-pixel patches (32 px: a 512 px side is grid 16) and
there are h x w VQ codes (side / 8 each). 512x512 -> 64*65 + 4 = 4,164 tokens.

Image codes map to vocabulary ids through the Chameleon naming scheme (`IMGIMG` + the
code's decimal digits written A..J + `Z`), so the same layout serves a real checkpoint's
`vocabulary_map` and the tiny policy this project builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

_DIGIT_LETTERS = "ABCDEFGHIJ"


def image_code_name(code: int) -> str:
    """Chameleon's vocabulary name for image code `code` (e.g. 123 -> 'IMGIMGBCDZ')."""
    return "IMGIMG" + "".join(_DIGIT_LETTERS[int(d)] for d in str(code)) + "Z"


def parse_image_code_name(name: str) -> Optional[int]:
    """Inverse of `image_code_name`; None for any other token name."""
    if not (name.startswith("IMGIMG") and name.endswith("Z")) or len(name) < 8:
        return None
    body = name[6:-1]
    if not all(c in _DIGIT_LETTERS for c in body):
        return None
    return int("".join(str(_DIGIT_LETTERS.index(c)) for c in body))


def span_length(grid_h: int, grid_w: int) -> int:
    """Tokens in an image span with `grid_h x grid_w` codes (rows end in a newline)."""
    return grid_h * (grid_w + 1) + 4


@dataclass(frozen=True)
class TokenLayout:
    """Token ids of the image-span vocabulary.

    image_code_ids[c] is the vocabulary id of VQ code c; grid token for n patches is
    grid_base + n, n in 1..max_grid.
    """

    image_start: int
    image_end: int
    row_newline: int
    grid_base: int
    max_grid: int
    image_code_ids: Tuple[int, ...]
    patch_px: int = 32
    downsample: int = 8

    def __post_init__(self):
        ids = np.asarray(self.image_code_ids, dtype=np.int64)
        specials = [self.image_start, self.image_end, self.row_newline]
        grids = range(self.grid_base + 1, self.grid_base + self.max_grid + 1)
        taken = set(specials) | set(grids)
        if len(set(specials)) != 3:
            raise ValueError(f"image_start/image_end/row_newline must differ, got {specials}")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("image code ids are not unique")
        if taken & set(ids.tolist()):
            raise ValueError("image code ids overlap the special/grid token ids")
        if self.patch_px % self.downsample:
            raise ValueError(f"patch_px {self.patch_px} is not a multiple of downsample {self.downsample}")
        lut = np.full(int(max(ids.max(initial=0), max(taken)) + 1), -1, dtype=np.int64)
        lut[ids] = np.arange(len(ids))
        object.__setattr__(self, "_code_ids", ids)
        object.__setattr__(self, "_id_to_code", lut)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_vocabulary_map(
        cls,
        vocabulary_map: Mapping[str, int],
        *,
        image_start: int,
        image_end: int,
        row_newline: int,
        grid_base: int,
        max_grid: int,
        codebook_size: int,
        patch_px: int = 32,
        downsample: int = 8,
    ) -> "TokenLayout":
        codes: Dict[int, int] = {}
        for name, tok in vocabulary_map.items():
            code = parse_image_code_name(name)
            if code is not None:
                codes[code] = int(tok)
        missing = [c for c in range(codebook_size) if c not in codes]
        if missing:
            raise ValueError(
                f"vocabulary_map names {len(codes)} image codes (IMGIMG...Z) but the VQ codebook "
                f"has {codebook_size}; first missing code: {missing[0]}"
            )
        return cls(
            image_start=image_start,
            image_end=image_end,
            row_newline=row_newline,
            grid_base=grid_base,
            max_grid=max_grid,
            image_code_ids=tuple(codes[c] for c in range(codebook_size)),
            patch_px=patch_px,
            downsample=downsample,
        )

    # ---- properties ---------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return len(self.image_code_ids)

    @property
    def code_ids(self) -> np.ndarray:
        return self._code_ids

    def image_span_ids(self) -> np.ndarray:
        """Every id that belongs to image spans: codes, start/end, row newline, grid tokens."""
        grids = np.arange(self.grid_base + 1, self.grid_base + self.max_grid + 1)
        return np.concatenate([self._code_ids, [self.image_start, self.image_end, self.row_newline], grids])

    def grid_token(self, n_patches: int) -> int:
        if not 1 <= n_patches <= self.max_grid:
            raise ValueError(f"grid of {n_patches} patches outside 1..{self.max_grid}")
        return self.grid_base + n_patches

    def grid_value(self, token: int) -> Optional[int]:
        n = int(token) - self.grid_base
        return n if 1 <= n <= self.max_grid else None

    def is_image_code(self, tokens) -> np.ndarray:
        t = np.asarray(tokens, dtype=np.int64)
        ok = (t >= 0) & (t < len(self._id_to_code))
        out = np.zeros(t.shape, dtype=bool)
        out[ok] = self._id_to_code[t[ok]] >= 0
        return out

    def ids_to_codes(self, tokens) -> np.ndarray:
        t = np.asarray(tokens, dtype=np.int64)
        if not self.is_image_code(t).all():
            raise ValueError("token ids include non-image-code tokens")
        return self._id_to_code[t]

    def codes_to_ids(self, codes) -> np.ndarray:
        c = np.asarray(codes, dtype=np.int64)
        if c.size and (c.min() < 0 or c.max() >= self.codebook_size):
            raise ValueError(f"codes outside [0, {self.codebook_size})")
        return self._code_ids[c]

    def codes_per_side(self, pixels: int) -> int:
        if pixels % self.patch_px:
            raise ValueError(f"image side {pixels} px is not a multiple of the {self.patch_px}-px grid patch")
        return pixels // self.downsample

    # ---- spans --------------------------------------------------------------------------
    def image_span(self, codes: np.ndarray) -> List[int]:
        """[h, w] code grid -> token ids of the full image span."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.size == 0:
            raise ValueError(f"expected a non-empty [h, w] code grid, got shape {codes.shape}")
        h, w = codes.shape
        per_patch = self.patch_px // self.downsample
        if h % per_patch or w % per_patch:
            raise ValueError(f"code grid {h}x{w} is not a whole number of {self.patch_px}-px patches")
        ids = self.codes_to_ids(codes)
        rows = np.concatenate([ids, np.full((h, 1), self.row_newline, dtype=np.int64)], axis=1)
        head = [self.image_start, self.grid_token(h // per_patch), self.grid_token(w // per_patch)]
        return head + rows.reshape(-1).tolist() + [self.image_end]

    def parse_image_span(self, tokens: Sequence[int]) -> Tuple[Optional[np.ndarray], str]:
        """Token ids from image_start to image_end inclusive -> ([h, w] codes, "") or (None, why).

        Never raises: every structural fault is returned as a reason.
        """
        t = np.asarray(list(tokens), dtype=np.int64)
        if len(t) < 2 or t[0] != self.image_start:
            return None, "image span does not open with the image-start token"
        if t[-1] != self.image_end:
            return None, "image span is not closed (truncated)"
        if len(t) < 4:
            return None, "image span has no grid tokens"
        gh, gw = self.grid_value(t[1]), self.grid_value(t[2])
        if gh is None or gw is None:
            return None, "image span grid tokens are missing or out of range"
        per_patch = self.patch_px // self.downsample
        h, w = gh * per_patch, gw * per_patch
        body = t[3:-1]
        if len(body) != h * (w + 1):
            return None, f"image span has {len(body)} body tokens, grid {gh}x{gw} needs {h * (w + 1)}"
        grid = body.reshape(h, w + 1)
        if not (grid[:, w] == self.row_newline).all():
            return None, "image span rows do not end in the row-newline token"
        codes = grid[:, :w]
        if not self.is_image_code(codes).all():
            return None, "image span contains non-image tokens inside a row"
        return self._id_to_code[codes], ""
