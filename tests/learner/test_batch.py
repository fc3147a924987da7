"""pack / pack_grpo (learner/batch.py) on hand-written rows: padding, the prompt/response
boundary of the loss mask, image vs text targets, and where rollout log-probs land."""

import numpy as np
import pytest

from learner.batch import pack, pack_grpo

IMAGE = np.array([900, 901, 902])  # ids counted as image tokens


def test_rows_are_right_padded_and_the_loss_covers_exactly_the_response_targets():
    b = pack([[1, 2, 3], [4]], [[5, 900], [6, 901, 7, 8]], pad_id=99, image_token_ids=IMAGE)
    np.testing.assert_array_equal(b["input_ids"], [[1, 2, 3, 5, 900], [4, 6, 901, 7, 8]])
    np.testing.assert_array_equal(b["attention_mask"], [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    # column j scores token j + 1: row 0's response tokens 5, 900 are targets 3 and 4 -> columns 2, 3
    np.testing.assert_array_equal(b["loss_mask"], [[0, 0, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(b["is_image"], [[0, 0, 0, 1], [0, 1, 0, 0]])
    short = pack([[1, 2]], [[3]], pad_id=99)
    assert short["loss_mask"].tolist() == [[0.0, 1.0]] and short["is_image"].sum() == 0
    padded = pack([[1, 2], [1]], [[3], [4, 5, 6]], pad_id=99)
    np.testing.assert_array_equal(padded["input_ids"][0], [1, 2, 3, 99])
    np.testing.assert_array_equal(padded["attention_mask"][0], [1, 1, 1, 0])
    np.testing.assert_array_equal(padded["loss_mask"][0], [0, 1, 0])  # padding is never a target


def test_rollout_logprobs_sit_on_their_tokens_columns():
    b = pack_grpo([[1, 2, 3], [4]], [[5, 900], [6, 901, 7]], [0.5, -1.0], [[-0.1, -0.2], [-1.0, -2.0, -3.0]])
    np.testing.assert_allclose(b["rollout_logp"], [[0, 0, -0.1, -0.2], [-1.0, -2.0, -3.0, 0]])
    np.testing.assert_array_equal(b["rollout_logp"] != 0, b["loss_mask"] > 0)
    assert b["advantages"].dtype == np.float32 and b["advantages"].tolist() == [0.5, -1.0]


def test_mismatched_or_empty_input_is_refused():
    with pytest.raises(ValueError, match="2 rollout log-probs for 3 tokens"):
        pack_grpo([[1]], [[2, 3, 4]], [1.0], [[-0.1, -0.2]])
    with pytest.raises(ValueError, match="empty prompt"):
        pack([[]], [[1]])
    with pytest.raises(ValueError, match="as many responses"):
        pack([[1]], [])
