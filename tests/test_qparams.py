"""qparams.py: weight clipping thresholds per channel and per tensor."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.qparams import weight_absmax


def test_weight_absmax_per_channel():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((4, 3, 3, 3))
    w[2] *= 10
    np.testing.assert_allclose(weight_absmax(w, 0), np.abs(w).reshape(4, -1).max(axis=1))
    assert weight_absmax(w, None) == pytest.approx(np.abs(w).max())



def test_weight_mse_clips_long_channels_and_lowers_the_error():
    heavy = np.random.default_rng(5).standard_t(4, (4, 100_000))  # long rows: clipping pays
    clipped, full = weight_absmax(heavy, 0, "mse"), weight_absmax(heavy, 0, "minmax")
    assert np.all(clipped <= full) and np.all(clipped < 0.95 * full)

    def error(limit):
        scale = limit[:, None] / 127
        return ((heavy - np.clip(np.round(heavy / scale), -127, 127) * scale) ** 2).sum()

    assert error(weight_absmax(heavy, 0, "mse")) < error(weight_absmax(heavy, 0, "minmax"))
