import numpy as np
import pytest

from vlcot.layout import TokenLayout, image_code_name, parse_image_code_name, span_length


def paper_layout(codebook=16384):
    # Lumina-mGPT ids for the specials; codes placed after them.
    return TokenLayout(image_start=8197, image_end=8196, row_newline=8803, grid_base=8804, max_grid=64,
                       image_code_ids=tuple(range(10000, 10000 + codebook)))


@pytest.mark.parametrize("side,expected", [(512, 4164), (256, 1060), (128, 276)])
def test_span_token_counts_match_the_paper(side, expected):
    layout = paper_layout()
    n = layout.codes_per_side(side)
    codes = np.random.default_rng(0).integers(0, 16384, size=(n, n))
    span = layout.image_span(codes)
    assert len(span) == expected == span_length(n, n)
    assert span[0] == 8197 and span[-1] == 8196
    assert span[1] == span[2] == 8804 + side // 32  # grid tokens count 32-px patches
    # a newline ends every one of the n rows
    assert sum(t == 8803 for t in span) == n


def test_span_roundtrip_non_square():
    layout = paper_layout()
    codes = np.random.default_rng(1).integers(0, 16384, size=(8, 16))
    back, why = layout.parse_image_span(layout.image_span(codes))
    assert why == ""
    np.testing.assert_array_equal(back, codes)


def test_image_code_names_roundtrip():
    assert image_code_name(0) == "IMGIMGAZ"
    assert image_code_name(123) == "IMGIMGBCDZ"
    for c in (0, 9, 10, 8191, 16383):
        assert parse_image_code_name(image_code_name(c)) == c
    assert parse_image_code_name("IMGIMGZ") is None
    assert parse_image_code_name("hello") is None
    assert parse_image_code_name("IMGIMGAKZ") is None  # K is not a digit letter


def test_from_vocabulary_map_orders_codes_by_name():
    rng = np.random.default_rng(0)
    ids = rng.permutation(np.arange(100, 116))
    vmap = {image_code_name(c): int(ids[c]) for c in range(16)}
    layout = TokenLayout.from_vocabulary_map(vmap, image_start=1, image_end=2, row_newline=3, grid_base=3,
                                             max_grid=4, codebook_size=16, patch_px=16, downsample=8)
    assert layout.image_code_ids == tuple(int(i) for i in ids)
    np.testing.assert_array_equal(layout.ids_to_codes(ids[[5, 0]]), [5, 0])
    with pytest.raises(ValueError, match="first missing code: 16"):
        TokenLayout.from_vocabulary_map(vmap, image_start=1, image_end=2, row_newline=3, grid_base=3,
                                        max_grid=4, codebook_size=17, patch_px=16, downsample=8)


def test_layout_rejects_overlapping_ids():
    with pytest.raises(ValueError, match="overlap"):
        TokenLayout(image_start=1, image_end=2, row_newline=3, grid_base=3, max_grid=4, image_code_ids=(4, 5, 6))


@pytest.mark.parametrize("mutate,reason", [
    (lambda s: s[:-1], "not closed"),
    (lambda s: s[1:], "does not open"),
    (lambda s: [s[0], 5, s[2]] + s[3:], "grid"),
    (lambda s: s[:3] + s[4:], "body tokens"),
    (lambda s: s[:3 + 4] + [999] + s[3 + 5:], "row-newline"),
    (lambda s: s[:3] + [1] + s[4:], "non-image"),
])
def test_parse_span_faults_have_reasons(mutate, reason):
    layout = TokenLayout(image_start=1000, image_end=1001, row_newline=1002, grid_base=1002, max_grid=8,
                         image_code_ids=tuple(range(2000, 2016)))
    span = layout.image_span(np.arange(16).reshape(4, 4))
    codes, why = layout.parse_image_span(mutate(span))
    assert codes is None and reason in why
