"""onnxq.qmath against the ONNX spec, as implemented by onnx.reference.ReferenceEvaluator."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from onnxq import qmath
from tests.helpers import make_model, tensor_info

QTYPES = {
    "uint8": TensorProto.UINT8,
    "int8": TensorProto.INT8,
    "uint16": TensorProto.UINT16,
    "int16": TensorProto.INT16,
}


def _single_node(op: str, x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None):
    attrs = {} if axis is None else {"axis": axis}
    node = helper.make_node(op, ["x", "scale", "zp"], ["y"], **attrs)
    out_type = TensorProto.FLOAT if op == "DequantizeLinear" else helper.np_dtype_to_tensor_dtype(zp.dtype)
    model = make_model(
        [node],
        [tensor_info("x", helper.np_dtype_to_tensor_dtype(x.dtype), list(x.shape))],
        [tensor_info("y", out_type, list(x.shape))],
        {"scale": np.asarray(scale, np.float32), "zp": np.asarray(zp)},
    )
    return ReferenceEvaluator(model).run(None, {"x": x})[0]


def ref_quantize(x, scale, zp, axis=None):
    return _single_node("QuantizeLinear", np.asarray(x, np.float32), scale, np.asarray(zp), axis)


def ref_dequantize(q, scale, zp, axis=None):
    return _single_node("DequantizeLinear", q, scale, np.asarray(zp), axis)


def assert_bit_exact(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


# --- QuantizeLinear / DequantizeLinear ------------------------------------------------------------
HALVES = np.array([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5, 10.5, 11.5, 0.0, -0.0], np.float32)


@pytest.mark.parametrize(
    ("dtype", "zp"),
    [("uint8", 0), ("uint8", 128), ("uint8", 7), ("int8", 0), ("int8", -5), ("uint16", 1000), ("int16", 3)],
)
def test_round_half_to_even(dtype: str, zp: int) -> None:
    zero_point = np.array(zp, dtype=dtype)
    got = qmath.quantize(HALVES, np.float32(1.0), zero_point)
    assert_bit_exact(got, ref_quantize(HALVES, np.float32(1.0), zero_point))
    # banker's rounding, spelled out: 0.5→0, 1.5→2, 2.5→2, 3.5→4, -0.5→0, -1.5→-2, -2.5→-2, -3.5→-4
    expected = np.array([0, 2, 2, 4, 0, -2, -2, -4, 10, 12, 0, 0]) + zp
    info = np.iinfo(dtype)
    np.testing.assert_array_equal(got.astype(np.int64), np.clip(expected, info.min, info.max))


def test_round_half_to_even_with_non_unit_scale() -> None:
    # x / scale lands exactly on .5 for a power-of-two scale
    scale = np.float32(0.25)
    x = HALVES * scale
    for zp in (np.uint8(10), np.int8(0)):
        got = qmath.quantize(x, scale, np.asarray(zp))
        assert_bit_exact(got, ref_quantize(x, scale, np.asarray(zp)))
    assert qmath.quantize(np.float32([0.125]), scale, np.int8(0))[0] == 0  # 0.5 → 0
    assert qmath.quantize(np.float32([0.375]), scale, np.int8(0))[0] == 2  # 1.5 → 2
    assert qmath.quantize(np.float32([0.625]), scale, np.int8(0))[0] == 2  # 2.5 → 2


@pytest.mark.parametrize("dtype", list(QTYPES))
@pytest.mark.parametrize("zp", [0, 1, -1])
def test_saturation(dtype: str, zp: int) -> None:
    info = np.iinfo(dtype)
    if zp < 0 and info.min == 0:
        zp = info.max  # an unsigned zero point at the top of the range
    zero_point = np.array(zp, dtype=dtype)
    # |x / scale| stays below 2**31: the reference evaluator casts to int32 before clipping
    x = np.array([1e3, -1e3, 1e5, -1e5, 1e7, -1e7, info.max + 0.5, info.min - 0.5], np.float32)
    got = qmath.quantize(x, np.float32(0.01), zero_point)
    assert_bit_exact(got, ref_quantize(x, np.float32(0.01), zero_point))
    # far beyond int32 (where the reference itself overflows) onnxq still saturates
    huge = qmath.quantize(np.float32([1e30, -1e30, 1e12, -1e12]), np.float32(0.01), zero_point)
    np.testing.assert_array_equal(huge, [info.max, info.min, info.max, info.min])
    assert got[4] == info.max and got[5] == info.min
    assert got[0] == info.max and got[1] == info.min


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_per_axis_quantize_and_dequantize(axis: int, dtype: str) -> None:
    rng = np.random.default_rng(axis)
    x = (rng.normal(size=(4, 6, 3)) * 5).astype(np.float32)
    n = x.shape[axis]
    scale = rng.uniform(0.01, 0.2, size=n).astype(np.float32)
    info = np.iinfo(dtype)
    zp = rng.integers(max(info.min, -20), min(info.max, 20), size=n).astype(dtype)
    q = qmath.quantize(x, scale, zp, axis)
    assert_bit_exact(q, ref_quantize(x, scale, zp, axis))
    assert_bit_exact(qmath.dequantize(q, scale, zp, axis), ref_dequantize(q, scale, zp, axis))
    # each slice along the axis uses its own parameters
    for c in range(n):
        sl = np.take(x, c, axis=axis)
        np.testing.assert_array_equal(np.take(q, c, axis=axis), qmath.quantize(sl, scale[c], zp[c]))


def test_per_axis_differs_from_per_tensor() -> None:
    x = np.array([[1.0, 1.0], [1.0, 1.0]], np.float32)
    scale = np.array([0.5, 0.25], np.float32)
    zp = np.zeros(2, np.int8)
    np.testing.assert_array_equal(qmath.quantize(x, scale, zp, 0), [[2, 2], [4, 4]])
    np.testing.assert_array_equal(qmath.quantize(x, scale, zp, 1), [[2, 4], [2, 4]])


@pytest.mark.parametrize("dtype", list(QTYPES))
def test_dequantize_matches_reference(dtype: str) -> None:
    info = np.iinfo(dtype)
    q = np.array([info.min, info.max, 0, 1, info.min + 1], dtype=dtype)
    zp = np.array(min(max(3, info.min), info.max), dtype=dtype)
    got = qmath.dequantize(q, np.float32(0.037), zp)
    assert got.dtype == np.float32
    assert_bit_exact(got, ref_dequantize(q, np.float32(0.037), zp))


# --- scale and zero point -------------------------------------------------------------------------
U8, I8 = qmath.int_type("uint8"), qmath.int_type("int8")


@pytest.mark.parametrize(
    ("rmin", "rmax"), [(1.0, 3.0), (-3.0, -1.0), (0.5, 0.5), (-2.0, 5.0), (0.0, 4.0), (-4.0, 0.0)]
)
@pytest.mark.parametrize("qtype", [U8, I8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_range_always_includes_zero(rmin, rmax, qtype, symmetric) -> None:
    scale, zp = qmath.scale_zero_point(rmin, rmax, qtype, symmetric)
    assert scale.dtype == np.float32 and scale > 0
    assert np.asarray(zp).dtype == qtype.np_dtype
    # 0.0 is exactly representable: it quantizes to the zero point and comes back as 0.0
    q0 = qmath.quantize(np.zeros(1, np.float32), scale, np.asarray(zp))
    assert q0[0] == zp
    assert qmath.dequantize(q0, scale, np.asarray(zp))[0] == 0.0
    # the covered real range [ (qmin-zp)*s, (qmax-zp)*s ] contains [min(rmin,0), max(rmax,0)]
    qmin, qmax = qmath.quant_range(qtype, symmetric)
    lo = (qmin - float(zp)) * float(scale)
    hi = (qmax - float(zp)) * float(scale)
    tol = float(scale)  # the zero point is rounded to an integer
    assert lo <= min(rmin, 0.0) + tol
    assert hi >= max(rmax, 0.0) - tol


def test_positive_only_range_uint8() -> None:
    scale, zp = qmath.scale_zero_point(1.0, 3.0, U8, False)
    assert zp == 0  # rmin widened to 0
    assert scale == np.float32(3.0 / 255)


def test_symmetric_int8_uses_127() -> None:
    scale, zp = qmath.scale_zero_point(-0.5, 2.54, I8, True)
    assert zp == 0 and np.asarray(zp).dtype == np.int8
    assert scale == np.float32(2.54 / 127)
    assert qmath.quant_range(I8, True) == (-127, 127)
    assert qmath.quant_range(I8, False) == (-128, 127)
    # the extremes of the range map to ±127, never -128
    q = qmath.quantize(np.float32([-2.54, 2.54, -10.0]), scale, np.asarray(zp))
    np.testing.assert_array_equal(q[:2], [-127, 127])


def test_symmetric_per_channel() -> None:
    rmin = np.array([-1.0, -0.2, 0.0, -3.0])
    rmax = np.array([0.5, 0.4, 0.0, 6.0])
    scale, zp = qmath.scale_zero_point(rmin, rmax, I8, True)
    np.testing.assert_array_equal(zp, np.zeros(4, np.int8))
    assert zp.dtype == np.int8
    np.testing.assert_array_equal(scale, np.float32([1.0 / 127, 0.4 / 127, 1.0, 6.0 / 127]))


@pytest.mark.parametrize(
    ("rmin", "rmax"), [(-1.0, 1.0), (-0.3, 2.7), (-2.7, 0.3), (-0.001, 100.0), (-1.234, 5.678)]
)
def test_uint8_asymmetric_zero_point_rounding(rmin: float, rmax: float) -> None:
    scale, zp = qmath.scale_zero_point(rmin, rmax, U8, False)
    expected_scale = (rmax - rmin) / 255.0
    assert scale == np.float32(expected_scale)
    expected_zp = int(np.clip(np.rint(0 - rmin / expected_scale), 0, 255))
    assert int(zp) == expected_zp
    assert np.asarray(zp).dtype == np.uint8


def test_uint8_zero_point_half_rounds_to_even() -> None:
    # rmin / scale = -127.5 exactly: zero point 128 (round half to even), not 127 or 129
    scale, zp = qmath.scale_zero_point(-127.5, 127.5, U8, False)
    assert scale == np.float32(1.0)
    assert int(zp) == 128
    scale, zp = qmath.scale_zero_point(-126.5, 128.5, U8, False)
    assert int(zp) == 126


@pytest.mark.parametrize("qtype", [U8, I8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_all_zero_tensor_gets_scale_one(qtype, symmetric) -> None:
    scale, _ = qmath.scale_zero_point(0.0, 0.0, qtype, symmetric)
    assert scale == np.float32(1.0)
    w = np.zeros((3, 4), np.float32)
    lo, hi = qmath.channel_range(w, 0)
    scales, zps = qmath.scale_zero_point(lo, hi, qtype, symmetric)
    np.testing.assert_array_equal(scales, np.ones(3, np.float32))
    q = qmath.quantize(w, scales, zps, 0)
    np.testing.assert_array_equal(qmath.dequantize(q, scales, zps, 0), w)


def test_channel_range() -> None:
    w = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 10
    lo, hi = qmath.channel_range(w, 1)
    np.testing.assert_array_equal(lo, [-10, -6, -2])
    np.testing.assert_array_equal(hi, [5, 9, 13])
    lo, hi = qmath.channel_range(w, None)
    assert (lo, hi) == (-10, 13)


# --- int32 bias -----------------------------------------------------------------------------------
def test_quantize_bias_saturates_int32() -> None:
    bias = np.array([1e30, -1e30, 3e9, -3e9, 2.5, 3.5, -2.5, 0.0], np.float32)
    q = qmath.quantize_bias(bias, np.float32(1.0))
    assert q.dtype == np.int32
    info = np.iinfo(np.int32)
    np.testing.assert_array_equal(q, [info.max, info.min, info.max, info.min, 2, 4, -2, 0])


def test_quantize_bias_per_channel_scale() -> None:
    bias = np.array([1.0, -2.0, 0.3], np.float32)
    scale = np.array([0.5, 0.25, 0.1], np.float32)
    q = qmath.quantize_bias(bias, scale)
    np.testing.assert_array_equal(q, [2, -8, 3])
    assert q.dtype == np.int32


# --- property test --------------------------------------------------------------------------------
_floats = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def quant_cases(draw):
    dtype = draw(st.sampled_from(list(QTYPES)))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5))
    x = draw(hnp.arrays(np.float32, shape, elements=_floats))
    axis = draw(st.one_of(st.none(), st.integers(0, len(shape) - 1)))
    n = 1 if axis is None else shape[axis]
    scale = draw(hnp.arrays(np.float32, (n,), elements=st.floats(2.0**-10, 50.0, width=32)))
    info = np.iinfo(dtype)
    zp = draw(hnp.arrays(np.dtype(dtype), (n,), elements=st.integers(int(info.min), int(info.max))))
    if axis is None:
        scale, zp = scale.reshape(()), zp.reshape(())
    return x, scale, zp, axis


@settings(max_examples=150, deadline=None)
@given(quant_cases())
def test_quantize_dequantize_match_reference(case) -> None:
    x, scale, zp, axis = case
    q = qmath.quantize(x, scale, zp, axis)
    assert_bit_exact(q, ref_quantize(x, scale, zp, axis))
    assert_bit_exact(qmath.dequantize(q, scale, zp, axis), ref_dequantize(q, scale, zp, axis))


@settings(max_examples=100, deadline=None)
@given(
    st.floats(-1e3, 1e3, width=32),
    st.floats(-1e3, 1e3, width=32),
    st.sampled_from([U8, I8]),
    st.booleans(),
)
def test_scale_zero_point_properties(a: float, b: float, qtype, symmetric: bool) -> None:
    rmin, rmax = min(a, b), max(a, b)
    scale, zp = qmath.scale_zero_point(rmin, rmax, qtype, symmetric)
    assert np.isfinite(scale) and scale > 0
    qmin, qmax = qmath.quant_range(qtype, symmetric)
    assert qmin <= int(zp) <= qmax
    if symmetric and qtype is I8:
        assert int(zp) == 0
    # the range endpoints round-trip within one step
    x = np.array([rmin, rmax, 0.0], np.float32)
    q = qmath.quantize(x, scale, np.asarray(zp))
    back = qmath.dequantize(q, scale, np.asarray(zp))
    assert back[2] == 0.0
    np.testing.assert_allclose(back[:2], x[:2], atol=float(scale) * 1.01 + 1e-6)
