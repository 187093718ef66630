import numpy as np
import pytest

from qcompile.quant import QuantDType, TensorRange, activation_qparams, dequantize, quantize, weight_qparams


@pytest.mark.parametrize("dtype,symmetric", [(QuantDType.UINT8, False), (QuantDType.INT8, True),
                                             (QuantDType.UINT16, False), (QuantDType.INT8, False)])
def test_activation_round_trip_error_is_half_an_lsb(dtype, symmetric):
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.7, 2.3, 10_000).astype(np.float32)
    qp = activation_qparams(TensorRange(float(x.min()), float(x.max())), dtype, symmetric=symmetric)
    err = np.abs(dequantize(quantize(x, qp), qp) - x)
    assert err.max() <= float(qp.scale) * 0.5 + 1e-6
    # Zero is exactly representable (padding and ReLU zeros stay exact).
    assert dequantize(quantize(np.zeros(1, np.float32), qp), qp)[0] == 0.0


def test_weight_qparams_are_symmetric_per_channel():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * np.array([1, 10, 0.1, 0])[:, None, None, None]
    qp = weight_qparams(w, 0, QuantDType.INT8)
    assert qp.scale.shape == (4,) and np.all(qp.zero_point == 0)
    q = quantize(w, qp, symmetric_range=True)
    assert q.min() >= -127 and q.max() <= 127
    np.testing.assert_array_equal(np.abs(q).reshape(4, -1).max(axis=1)[:3], 127)
    err = np.abs(dequantize(q, qp) - w).reshape(4, -1).max(axis=1)
    assert np.all(err <= qp.scale * 0.5 + 1e-7)
