"""Reference quantizer (edgemoe_ort.quant) against docs/bundle-format.md, "Quantization formats"."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgemoe_ort.quant import (
    BITS,
    BITS_TO_DTYPE,
    DTYPES,
    FORMATS,
    QUANTIZED_DTYPES,
    QuantizedMatrix,
    dequantize,
    pack_bits,
    pack_u4,
    quantize,
    unpack_bits,
    unpack_u4,
)

QMAX = {"int8": 255, "int4": 15, "int3": 7, "int2": 3}


def slow_reference(
    w: np.ndarray, dtype: str, gs: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Element-by-element transcription of the spec: (q [out,in], s16 [out,G], z [out,G], w' [out,in])."""
    qmax = QMAX[dtype]
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    g = math.ceil(cols / gs)
    q = np.zeros((rows, cols), np.uint8)
    s16 = np.zeros((rows, g), np.float16)
    z = np.zeros((rows, g), np.uint8)
    deq = np.zeros((rows, cols), np.float32)
    for r in range(rows):
        for j in range(g):
            grp = w[r, j * gs : (j + 1) * gs]
            lo = min(np.float32(0), grp.min())
            hi = max(np.float32(0), grp.max())
            s = np.float16((hi - lo) / np.float32(qmax))
            if s == 0:
                s = np.float16(1)
            sf = np.float32(s)
            zz = np.float32(min(max(np.rint(-lo / sf), 0), qmax))
            s16[r, j], z[r, j] = s, np.uint8(zz)
            for c in range(j * gs, min((j + 1) * gs, cols)):
                qq = min(max(np.rint(w[r, c] / sf) + zz, 0), qmax)
                q[r, c] = np.uint8(qq)
                deq[r, c] = (np.float32(qq) - zz) * sf
    return q, s16, z, deq


def raw_q(qm: QuantizedMatrix) -> np.ndarray:
    bits = BITS[qm.dtype]
    return unpack_bits(qm.data, qm.shape[1], bits) if bits < 8 else qm.data


def bitwise_pack(q: np.ndarray, bits: int) -> np.ndarray:
    """The packing rule transcribed: bit k of value c is bit (bits*c + k) % 8 of byte (bits*c + k) // 8."""
    rows, cols = q.shape
    out = np.zeros((rows, -(-bits * cols // 8)), np.uint8)
    for r in range(rows):
        for c in range(cols):
            for k in range(bits):
                if (int(q[r, c]) >> k) & 1:
                    pos = bits * c + k
                    out[r, pos // 8] |= 1 << (pos % 8)
    return out


def test_format_table() -> None:
    assert DTYPES == ("fp32", "fp16", "int8", "int4", "int3", "int2")
    assert BITS == {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4, "int3": 3, "int2": 2}
    assert BITS_TO_DTYPE == {32: "fp32", 16: "fp16", 8: "int8", 4: "int4", 3: "int3", 2: "int2"}
    assert QUANTIZED_DTYPES == ("int8", "int4", "int3", "int2")
    assert [f.tensor_dtype for f in FORMATS] == ["f32", "f16", "u8", "u4", "u3", "u2"]


# -- exact small cases --
def test_int4_hand_computed_case() -> None:
    # lo=-1, hi=2 -> s = 3/15 = 0.2 -> f16 0.199951171875; z = rint(1/s16) = 5;
    # q = [rint(-5.0012)+5, rint(2.5006)+5, rint(10.0024)+5] = [0, 8, 15]
    qm = quantize(np.array([[-1.0, 0.5, 2.0]], np.float32), "int4", group_size=3)
    assert qm.scales is not None and qm.zeros is not None
    assert qm.scales.dtype == np.float16 and qm.scales.shape == (1, 1)
    assert float(qm.scales[0, 0]) == 0.199951171875
    assert qm.zeros.tolist() == [[5]]
    assert qm.data.dtype == np.uint8 and qm.data.tolist() == [
        [0x80, 0x0F]
    ]  # low nibble first, odd row padded
    s = np.float32(0.199951171875)
    expect = np.array([[(0 - 5) * s, (8 - 5) * s, (15 - 5) * s]], np.float32)
    np.testing.assert_array_equal(qm.dequantize(), expect)
    assert qm.dequantize().dtype == np.float32


def test_round_half_to_even() -> None:
    # range [0, 15] -> s = 1 exactly, z = 0: 2.5 -> 2 and 3.5 -> 4 (rint), not 3 and 4
    qm = quantize(np.array([[0.0, 2.5, 3.5, 15.0]]), "int4", group_size=4)
    assert float(qm.scales[0, 0]) == 1.0 and qm.zeros.tolist() == [[0]]
    assert unpack_u4(qm.data, 4).tolist() == [[0, 2, 4, 15]]
    # negative ties: range [-15, 0] -> s = 1, z = 15; -2.5 -> rint = -2 -> q = 13
    qm = quantize(np.array([[-15.0, -2.5, 0.0]]), "int4", group_size=3)
    assert qm.zeros.tolist() == [[15]]
    assert unpack_u4(qm.data, 3).tolist() == [[0, 13, 15]]
    np.testing.assert_array_equal(qm.dequantize(), [[-15.0, -2.0, 0.0]])


def test_int8_exact_integers() -> None:
    w = np.arange(-100, 155, dtype=np.float32).reshape(1, 255)  # lo=-100, hi=154 -> s=254/255
    qm = quantize(w, "int8", group_size=255)
    s = np.float16(np.float32(254) / np.float32(255))
    assert qm.scales[0, 0] == s
    z = np.rint(np.float32(100) / np.float32(s))
    assert qm.zeros[0, 0] == z
    q = np.clip(np.rint(w / np.float32(s)) + z, 0, 255)
    np.testing.assert_array_equal(qm.data, q.astype(np.uint8))
    np.testing.assert_array_equal(qm.dequantize(), (q - z).astype(np.float32) * np.float32(s))


def test_zero_is_exact_and_range_contains_zero() -> None:
    # all-positive group: lo must be 0, so z = 0 and 0.0 dequantizes to exactly 0
    qm = quantize(np.array([[0.0, 1.0, 2.0, 3.0]]), "int8", group_size=4)
    assert qm.zeros.tolist() == [[0]]
    assert qm.dequantize()[0, 0] == 0.0
    # all-negative group: hi must be 0, so z = qmax
    qm = quantize(np.array([[-3.0, -1.0, -2.0, 0.0]]), "int4", group_size=4)
    assert qm.zeros.tolist() == [[15]]
    assert qm.dequantize()[0, 3] == 0.0
    rng = np.random.default_rng(3)
    w = rng.standard_normal((7, 50)).astype(np.float32)
    w[rng.random(w.shape) < 0.3] = 0.0
    for dt in QUANTIZED_DTYPES:
        deq = quantize(w, dt, 16).dequantize()
        assert np.all(deq[w == 0.0] == 0.0), dt


def test_zero_groups_store_scale_one() -> None:
    w = np.zeros((2, 10), np.float32)
    w[1, :4] = [1.0, -2.0, 3.0, 0.5]
    qm = quantize(w, "int4", group_size=4)
    # groups: row0 all zero; row1 group0 nonzero, groups 1, 2 zero
    assert qm.scales.tolist() == [[1.0, 1.0, 1.0], [float(np.float16(5 / 15)), 1.0, 1.0]]
    assert qm.zeros.tolist() == [[0, 0, 0], [6, 0, 0]]  # z = rint(2 / f16(1/3)) = rint(6.0015) = 6
    deq = qm.dequantize()
    assert np.all(deq[0] == 0) and np.all(deq[1, 4:] == 0)


def test_tiny_weights_underflowing_f16_scale_flush_to_zero() -> None:
    w = np.full((1, 8), 1e-9, np.float32)
    qm = quantize(w, "int8", group_size=8)
    assert qm.scales.tolist() == [[1.0]] and qm.zeros.tolist() == [[0]]
    np.testing.assert_array_equal(qm.dequantize(), np.zeros((1, 8), np.float32))


# -- partial groups & layout --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["int8", "int4", "int3", "int2"])
@pytest.mark.parametrize("shape,gs", [((5, 37), 16), ((3, 10), 4), ((4, 64), 64), ((2, 7), 64), ((3, 9), 1)])
def test_matches_elementwise_spec(dtype: str, shape: tuple[int, int], gs: int) -> None:
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 5, size=(shape[0], 1))).astype(np.float32)
    qm = quantize(w, dtype, gs)
    q, s16, z, deq = slow_reference(w, dtype, gs)
    g = math.ceil(shape[1] / gs)
    assert qm.group_size == gs and qm.shape == shape
    assert qm.scales.shape == (shape[0], g) and qm.zeros.shape == (shape[0], g)
    np.testing.assert_array_equal(qm.scales, s16)
    np.testing.assert_array_equal(qm.zeros, z)
    np.testing.assert_array_equal(raw_q(qm), q)
    got = qm.dequantize()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, deq)  # bit-exact
    assert got.tobytes() == deq.tobytes()


def test_partial_last_group_has_its_own_range() -> None:
    w = np.array([[10.0, -10.0, 5.0, 1.0, 0.01, -0.02]], np.float32)  # gs=4 -> groups [0:4], [4:6]
    qm = quantize(w, "int8", group_size=4)
    assert qm.scales.shape == (1, 2)
    assert qm.scales[0, 1] == np.float16(np.float32(0.03) / np.float32(255))
    np.testing.assert_allclose(qm.dequantize()[0, 4:], w[0, 4:], atol=float(qm.scales[0, 1]))


def test_u4_packing_layout() -> None:
    q = np.array([[1, 2, 3, 4, 5], [15, 0, 0, 15, 7]], np.uint8)
    p = pack_u4(q)
    assert p.shape == (2, 3)
    assert p.tolist() == [[0x21, 0x43, 0x05], [0x0F, 0xF0, 0x07]]
    np.testing.assert_array_equal(unpack_u4(p, 5), q)
    rng = np.random.default_rng(0)
    for cols in (1, 2, 63, 64, 65):
        q = rng.integers(0, 16, size=(3, cols), dtype=np.uint8)
        p = pack_u4(q)
        assert p.shape == (3, (cols + 1) // 2)
        np.testing.assert_array_equal(unpack_u4(p, cols), q)
        if cols % 2:
            assert np.all(p[:, -1] >> 4 == 0)  # pad nibble is zero
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_u4(np.array([[16]]))


def test_packed_layout_by_hand() -> None:
    # u3: 8 values fill 3 bytes, values 2 and 5 straddle a byte; (0, 1, ..., 7) = 0x88 0xC6 0xFA. 19 values:
    # two such chunks and a 3-value tail (57 bits: 8 bytes, the last one's 7 high bits zero).
    q3 = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 7, 6, 5, 4, 3, 2, 1, 0, 5, 2, 7]], np.uint8)
    p3 = pack_bits(q3, 3)
    assert p3.dtype == np.uint8 and p3.tolist() == [[0x88, 0xC6, 0xFA, 0x77, 0x39, 0x05, 0xD5, 0x01]]
    np.testing.assert_array_equal(unpack_bits(p3, 19, 3), q3)
    # u2: 4 values per byte, value 0 in bits 0-1: (0, 1, 2, 3) = 0b11100100
    q2 = np.array([[0, 1, 2, 3, 3, 2, 1, 0, 1, 1, 2, 2, 3, 3, 0, 0, 2, 3, 1]], np.uint8)
    p2 = pack_bits(q2, 2)
    assert p2.tolist() == [[0xE4, 0x1B, 0xA5, 0x0F, 0x1E]]
    np.testing.assert_array_equal(unpack_bits(p2, 19, 2), q2)
    # u4 is the 4-bit case of the same rule (today's nibble order)
    q4 = np.array([[1, 2, 3, 4, 5]], np.uint8)
    assert pack_bits(q4, 4).tolist() == pack_u4(q4).tolist() == [[0x21, 0x43, 0x05]]
    # two rows: every row starts on a byte
    assert pack_bits(np.array([[7, 7, 7], [1, 0, 0]], np.uint8), 3).tolist() == [[0xFF, 0x01], [0x01, 0x00]]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_bits_matches_the_rule_and_round_trips(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for cols in (1, 2, 3, 7, 8, 9, 15, 16, 17, 63, 64, 65, 100):
        q = rng.integers(0, 1 << bits, size=(3, cols), dtype=np.uint8)
        p = pack_bits(q, bits)
        assert p.shape == (3, math.ceil(bits * cols / 8)) and p.dtype == np.uint8
        np.testing.assert_array_equal(p, bitwise_pack(q, bits))  # unused high bits zero included
        np.testing.assert_array_equal(unpack_bits(p, cols, bits), q)
        if bits == 4:
            np.testing.assert_array_equal(p, pack_u4(q))
            np.testing.assert_array_equal(unpack_u4(p, cols), q)
    assert pack_bits(np.zeros((2, 0), np.uint8), bits).shape == (2, 0)


def test_pack_bits_in_row_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    import edgemoe_ort.quant as qmod

    q = np.random.default_rng(2).integers(0, 8, size=(29, 21), dtype=np.uint8)
    whole = pack_bits(q, 3)
    monkeypatch.setattr(qmod, "_CHUNK_ELEMENTS", 50)  # 2 rows per chunk
    np.testing.assert_array_equal(qmod.pack_bits(q, 3), whole)


def test_pack_bits_errors() -> None:
    with pytest.raises(ValueError, match=r"pack_bits: 3-bit values must be in \[0, 7\], found \[0, 8\]"):
        pack_bits(np.array([[0, 8]]), 3)
    with pytest.raises(ValueError, match=r"2-bit values must be in \[0, 3\], found \[-1, 2\]"):
        pack_bits(np.array([[-1, 2]]), 2)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_u4(np.array([[16]]))
    with pytest.raises(ValueError, match=r"pack_bits: expected a 2-D array, found shape \(3,\)"):
        pack_bits(np.zeros(3, np.uint8), 3)
    for bad in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match=r"bits must be an int in \[1, 8\]"):
            pack_bits(np.zeros((1, 1), np.uint8), bad)  # type: ignore[arg-type]
    want = r"unpack_bits: expected shape \[rows, 4\] for 10 columns of 3 bits, found \(2, 5\)"
    with pytest.raises(ValueError, match=want):
        unpack_bits(np.zeros((2, 5), np.uint8), 10, 3)


def test_int3_int2_hand_computed_cases() -> None:
    # int3: range [0, 7] -> s = 1, z = 0; 2.5 -> 2 (ties to even), values stored in 3 bits each
    qm = quantize(np.array([[0.0, 2.5, 3.5, 7.0, 1.0]]), "int3", group_size=5)
    assert float(qm.scales[0, 0]) == 1.0 and qm.zeros.tolist() == [[0]]
    assert unpack_bits(qm.data, 5, 3).tolist() == [[0, 2, 4, 7, 1]]
    assert qm.data.tolist() == pack_bits(np.array([[0, 2, 4, 7, 1]]), 3).tolist()
    np.testing.assert_array_equal(qm.dequantize(), [[0.0, 2.0, 4.0, 7.0, 1.0]])
    # int2: lo=-1, hi=2 -> s = 3/3 = 1, z = 1; q = rint(w) + 1 clamped to [0, 3]
    qm = quantize(np.array([[-1.0, 0.4, 2.0, 1.6, -0.6]]), "int2", group_size=8)
    assert float(qm.scales[0, 0]) == 1.0 and qm.zeros.tolist() == [[1]]
    assert unpack_bits(qm.data, 5, 2).tolist() == [[0, 1, 3, 3, 0]]
    assert qm.data.shape == (1, 2)
    np.testing.assert_array_equal(qm.dequantize(), [[-1.0, 0.0, 2.0, 2.0, -1.0]])
    # all-zero group: s = 1, z = 0, q = 0
    qm = quantize(np.zeros((1, 9), np.float32), "int2", group_size=4)
    assert qm.scales.tolist() == [[1.0, 1.0, 1.0]] and qm.zeros.tolist() == [[0, 0, 0]]
    assert qm.data.tolist() == [[0, 0, 0]]


def test_packed_data_rows_are_byte_aligned() -> None:
    w = np.random.default_rng(1).standard_normal((4, 33)).astype(np.float32)
    for dtype in ("int3", "int2"):
        qm = quantize(w, dtype, group_size=8)
        nb = math.ceil(33 * BITS[dtype] / 8)
        assert qm.data.shape == (4, nb) and qm.data.dtype == np.uint8
        assert qm.nbytes == 4 * nb + 4 * 5 * 2 + 4 * 5
        np.testing.assert_array_equal(quantize(w[2:3], dtype, 8).data[0], qm.data[2])


def test_int4_data_rows_are_byte_aligned() -> None:
    w = np.random.default_rng(1).standard_normal((4, 33)).astype(np.float32)
    qm = quantize(w, "int4", group_size=8)
    assert qm.data.shape == (4, 17) and qm.data.dtype == np.uint8
    assert qm.nbytes == 4 * 17 + 4 * 5 * 2 + 4 * 5
    # each row decodes independently: quantizing a single row gives that row's bytes
    np.testing.assert_array_equal(quantize(w[2:3], "int4", 8).data[0], qm.data[2])


# -- error bounds --
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_error_bounds(dtype: str) -> None:
    rng = np.random.default_rng(42)
    w = (rng.standard_normal((64, 200)) / math.sqrt(200)).astype(np.float32)
    gs = 32
    qm = quantize(w, dtype, group_size=gs)
    deq = dequantize(qm)
    assert deq.shape == w.shape and deq.dtype == np.float32
    err = np.abs(deq.astype(np.float64) - w)
    if dtype == "fp32":
        assert np.array_equal(deq, w)
        assert qm.nbytes == w.nbytes
        return
    if dtype == "fp16":
        assert np.all(err <= np.abs(w) * 2.0**-11 + 2.0**-25)
        np.testing.assert_array_equal(qm.data, w.astype(np.float16))
        assert qm.nbytes == w.size * 2
        return
    qmax = QMAX[dtype]
    g = math.ceil(200 / gs)
    s = np.repeat(qm.scales.astype(np.float64), gs, axis=1)[:, :200]
    # half a step, plus the clamp at the range ends caused by rounding s to f16 (<= qmax * 2^-11 * s)
    bound = s * (0.5 + qmax * 2.0**-11) + 1e-7
    assert np.all(err <= bound), float((err - bound).max())
    rel = np.linalg.norm(deq - w) / np.linalg.norm(w)
    assert rel < {"int8": 0.01, "int4": 0.15, "int3": 0.3, "int2": 0.6}[dtype], rel
    bits = BITS[dtype]
    assert qm.nbytes == 64 * math.ceil(200 * bits / 8) + 64 * g * 3


def test_float64_input_is_converted_to_float32_first() -> None:
    w = np.random.default_rng(5).standard_normal((3, 20))
    for dt in DTYPES:
        a, b = quantize(w, dt, 8), quantize(w.astype(np.float32), dt, 8)
        np.testing.assert_array_equal(a.dequantize(), b.dequantize())


def test_dataclass_fields() -> None:
    w = np.ones((2, 3), np.float32)
    qm = quantize(w, "fp16")
    assert (qm.dtype, qm.shape, qm.group_size, qm.scales, qm.zeros) == ("fp16", (2, 3), 0, None, None)
    assert qm.data.dtype == np.float16
    qm = quantize(w, "int8", 2)
    assert (qm.dtype, qm.shape, qm.group_size) == ("int8", (2, 3), 2)


# -- errors --
def test_errors() -> None:
    w = np.ones((2, 4), np.float32)
    with pytest.raises(ValueError, match="unknown dtype 'int5'"):
        quantize(w, "int5")
    with pytest.raises(ValueError, match="unknown dtype"):
        QuantizedMatrix("bf16", (1, 1), 0, np.zeros((1, 1)), None, None)
    with pytest.raises(ValueError, match=r"2-D.*\(4,\)"):
        quantize(np.ones(4), "fp32")
    with pytest.raises(ValueError, match="2-D"):
        quantize(np.ones((2, 2, 2)), "int4")
    for gs in (0, -1):
        with pytest.raises(ValueError, match=f"group_size must be >= 1, found {gs}"):
            quantize(w, "int4", gs)
    with pytest.raises(ValueError, match="group_size must be an int"):
        quantize(w, "int4", 2.0)  # type: ignore[arg-type]
    for bad in (np.nan, np.inf, -np.inf):
        w2 = w.copy()
        w2[1, 2] = bad
        for dt in DTYPES:
            with pytest.raises(ValueError, match=r"finite.*\[1, 2\]"):
                quantize(w2, dt)
    with pytest.raises(ValueError, match="finite"):
        quantize(np.array([[1e300]]), "fp32")  # overflows float32
    with pytest.raises(ValueError, match="float16 range"):
        quantize(np.array([[70000.0]]), "fp16")
    with pytest.raises(ValueError, match="float16 scale"):
        quantize(np.array([[-1e6, 1e6]]), "int4")


@pytest.mark.parametrize("dtype", ["int4", "int8", "int3", "int2"])
def test_quantize_in_row_chunks_equals_one_piece(dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """quantize() bounds its temporaries by working on chunks of rows; the bytes must not depend on it."""
    import edgemoe_ort.quant as q

    w = np.random.default_rng(7).standard_normal((37, 70)).astype(np.float32)  # partial last group
    whole = q.quantize(w, dtype, 32)
    monkeypatch.setattr(q, "_CHUNK_ELEMENTS", 3 * 96)  # 3 rows per chunk, the last chunk shorter
    chunked = q.quantize(w, dtype, 32)
    for a, b in ((whole.data, chunked.data), (whole.scales, chunked.scales), (whole.zeros, chunked.zeros)):
        np.testing.assert_array_equal(a, b)
