"""GPTQ's tail damping: an input that is rare but large in calibration keeps its weight near round-to-nearest."""

from __future__ import annotations

import numpy as np

from onnxcomp.blockquant import gptq_round
from onnxcomp.calibrate import Gram
from onnxcomp.passes.quantize.static import QuantizeStaticConfig, _gptq_hessian


def test_gram_tracks_channel_absmax_and_tail_damp_raises_the_diagonal():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 100, 8)).astype(np.float32)
    x[1, 7, 5] = -40.0
    gram = Gram(rows=64)
    for batch in x:
        gram.update(batch)
    np.testing.assert_allclose(gram.absmax, np.abs(x).reshape(-1, 8).max(axis=0))
    plain = _gptq_hessian(gram, 0.0)
    damped = _gptq_hessian(gram, 0.01)
    np.testing.assert_allclose(plain, gram.xtx / 300)
    np.testing.assert_allclose(np.diag(damped) - np.diag(plain), 0.01 * gram.absmax ** 2)
    np.testing.assert_array_equal(damped - np.diag(np.diag(damped)), plain - np.diag(np.diag(plain)))
    assert QuantizeStaticConfig().gptq_tail_damp == 0.0


def test_tail_damp_keeps_a_rare_large_inputs_weights_near_nearest():
    """Input 61 (rounded late, so it receives the earlier columns' error) is a tenth of input 3 on all
    calibration rows but one, where it is large: plain GPTQ loads its weights with input 3's error."""
    rng = np.random.default_rng(0)
    k, n, rare = 64, 32, 61
    x = rng.normal(size=(2000, k))
    x[:, rare] = 0.1 * x[:, 3] + 0.002 * rng.normal(size=2000)
    x[0, rare] = 3.0
    w = rng.normal(size=(n, k))
    scale = np.abs(w).max(1) / 127
    gram = Gram()
    gram.update(x.astype(np.float32))
    nearest = np.round(w / scale[:, None])
    fire = x[:50].copy()
    fire[:, rare] = 3.0

    def error(rows, codes):
        return float(np.mean((rows @ (codes * scale[:, None]).T - rows @ w.T) ** 2))

    free = gptq_round(w, _gptq_hessian(gram, 0.0), scale, 127)
    damped = gptq_round(w, _gptq_hessian(gram, 0.01), scale, 127)
    assert np.abs(damped - nearest)[:, rare].max() < np.abs(free - nearest)[:, rare].max()
    assert error(fire, damped) < error(fire, free)
    assert error(x, damped) <= error(x, nearest)  # still better than nearest on the calibration rows
