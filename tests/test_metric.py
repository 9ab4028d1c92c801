import numpy as np
import pytest

from empathy.postprocessing import expand_to_frames
from empathy.utils import ccc, summarize_ccc


def test_ccc_matches_hand_computed_value():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    y = np.array([2.0, 2.0, 3.0, 5.0])
    # means 2.5 and 3; population variances 1.25 and 1.5; covariance 1.25
    assert ccc(x, y) == pytest.approx(2 * 1.25 / (1.25 + 1.5 + 0.25))
    assert ccc(x, y) == pytest.approx(5 / 6)


def test_ccc_penalizes_bias_and_scale_unlike_correlation():
    x = np.linspace(-1, 1, 50)
    assert ccc(x, x) == pytest.approx(1.0)
    assert ccc(x, -x) == pytest.approx(-1.0)
    # var 0.347..., shift by 0.5: 2v / (2v + 0.25)
    variance = x.var()
    assert ccc(x + 0.5, x) == pytest.approx(2 * variance / (2 * variance + 0.25))
    assert ccc(2 * x, x) == pytest.approx(2 * 2 * variance / (4 * variance + variance))


def test_constant_series_give_zero_not_nan():
    assert ccc(np.zeros(10), np.linspace(0, 1, 10)) == 0.0
    assert ccc(np.ones(10), np.ones(10)) == 0.0


def test_ccc_rejects_different_lengths():
    with pytest.raises(ValueError):
        ccc(np.zeros(3), np.zeros(4))


def test_expand_to_frames_repeats_then_cuts_or_pads():
    assert expand_to_frames([1, 2], 30).tolist() == [1] * 25 + [2] * 5
    assert expand_to_frames([1, 2], 55).tolist() == [1] * 25 + [2] * 30


def test_summaries_are_means_per_story_and_per_subject():
    records = [{"subject": 1, "story": 1, "ccc": 0.2}, {"subject": 2, "story": 1, "ccc": 0.4},
               {"subject": 1, "story": 2, "ccc": 0.6}]
    per_video, by_story, by_subject = summarize_ccc(records)
    assert len(per_video) == 3
    assert dict(zip(by_story.story, by_story.ccc)) == pytest.approx({1: 0.3, 2: 0.6})
    assert dict(zip(by_subject.subject, by_subject.ccc)) == pytest.approx({1: 0.4, 2: 0.4})
