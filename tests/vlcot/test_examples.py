import dataclasses

import numpy as np

from vlcot.data import prepare_data
from vlcot.manifest import read_manifest
from vlcot.examples import IGNORE_INDEX, build_example
from vlcot.trace import parse_response


def test_manifest_record_to_sft_example(tiny_cfg, stage_sides, tiny_policy, tiny_vq, tmp_path):
    data = dataclasses.replace(tiny_cfg.data, output_dir=str(tmp_path / "d"))
    prepare_data(tiny_cfg.image, tiny_cfg.degradation, data, progress=False)
    record = read_manifest(tmp_path / "d" / "manifest.jsonl")[0]
    ex = build_example(record, tiny_vq, tiny_policy.codec, tiny_policy.layout, tiny_cfg.image)
    parsed = parse_response(ex.response_ids, tiny_policy.codec, tiny_policy.layout, hr_size=tiny_cfg.image.hr_size)
    assert parsed.valid, parsed.invalid_reasons()
    assert parsed.degradation == record.degradation.labels
    assert parsed.stages["rough_understand"].text == record.captions.x4
    for stage in ("final_image", "rough_image"):
        assert parsed.stages[stage].codes.shape == (stage_sides[stage],) * 2
    ids, labels = ex.sft_pair()
    assert len(ids) == len(labels)
    assert labels[: len(ex.prompt_ids)] == [IGNORE_INDEX] * len(ex.prompt_ids)
    assert labels[len(ex.prompt_ids):] == ex.response_ids
    # the prompt's LR span has prompt_size / 8 codes per side
    lay = tiny_policy.layout
    start = ex.prompt_ids.index(lay.image_start)
    codes, _ = lay.parse_image_span(ex.prompt_ids[start: ex.prompt_ids.index(lay.image_end) + 1])
    assert codes.shape == (tiny_cfg.image.prompt_size // 8,) * 2
    # the final image is the HR image's own codes
    from PIL import Image
    hr_codes = tiny_vq.encode_images([Image.open(record.hr_path)], tiny_cfg.image.hr_size)[0]
    np.testing.assert_array_equal(parsed.stages["final_image"].codes, hr_codes)
