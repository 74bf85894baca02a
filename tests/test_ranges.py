"""ranges.py: range methods on synthetic distributions with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.calibrate import Histogram, MinMax
from onnxcomp.ranges import mse_range, percentile_range, tensor_range


def _histogram(values: np.ndarray, bins: int = 2048, batches: int = 8) -> Histogram:
    hist = Histogram(bins)
    for chunk in np.array_split(values.astype(np.float32), batches):
        hist.update(chunk)
    return hist


@pytest.fixture(scope="module")
def heavy_tailed() -> np.ndarray:
    return np.random.default_rng(0).standard_t(3, 200_000)


def test_minmax_is_exact(heavy_tailed):
    hist = _histogram(heavy_tailed)
    assert (hist.min, hist.max) == (pytest.approx(heavy_tailed.min()), pytest.approx(heavy_tailed.max()))
    reducer = MinMax()
    reducer.update(heavy_tailed)
    assert tensor_range(reducer, "mse") == (heavy_tailed.min(), heavy_tailed.max())  # MinMax: min-max


def test_percentile_of_a_uniform_histogram():
    values = np.linspace(-1, 1, 200_001)  # uniform on [-1, 1]: the p-th percentile is 2p - 1
    lo, hi = percentile_range(_histogram(values), 99.0)
    assert lo == pytest.approx(-0.98, abs=2e-3) and hi == pytest.approx(0.98, abs=2e-3)
    assert percentile_range(_histogram(values), 100.0) == (-1.0, 1.0)


def test_percentile_two_sided_on_skewed_data():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.uniform(0, 1, 100_000), rng.uniform(-10, 0, 100)])
    lo, hi = percentile_range(_histogram(values), 99.95)  # 50 of the 100 negatives lie below lo
    assert lo == pytest.approx(-5, abs=1.5) and hi == pytest.approx(1.0, abs=5e-3)


def test_heavy_tails_are_clipped_tighter_than_minmax(heavy_tailed):
    hist = _histogram(heavy_tailed)
    lo, hi = mse_range(hist)
    assert heavy_tailed.min() < lo < 0 < hi < heavy_tailed.max()
    assert hi - lo < 0.8 * (heavy_tailed.max() - heavy_tailed.min())


@pytest.mark.parametrize("method", ["percentile", "mse"])
def test_one_signed_data_keeps_zero_as_lower_bound(method, heavy_tailed):
    relu = np.maximum(heavy_tailed, 0)
    lo, hi = tensor_range(_histogram(relu), method)
    assert lo == 0.0 and 0 < hi <= relu.max()


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_uniform_data_is_not_clipped(method):
    values = np.random.default_rng(2).uniform(-1, 1, 100_000)
    lo, hi = tensor_range(_histogram(values), method)
    assert lo == pytest.approx(-1, abs=0.03) and hi == pytest.approx(1, abs=0.03)


def test_ranges_always_contain_zero():
    values = np.random.default_rng(3).uniform(2, 3, 1000)
    for method in ("minmax", "percentile", "mse"):
        lo, hi = tensor_range(_histogram(values), method)
        assert lo == 0.0 and hi <= 3.0
