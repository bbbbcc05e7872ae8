"""Numpy reference quantizer / dequantizer for expert weights (docs/bundle-format.md, "Quantization formats").

The C++ kernels are tested bit-for-bit against :func:`dequantize`, so the arithmetic here follows the spec
literally:

* the input is converted to float32 first and every quantization step is computed in float32;
* group-wise asymmetric unsigned quantization along the input dimension (``scheme = "asym_u"``), groups of
  ``group_size`` consecutive weights of one row, the last group of a row may be shorter;
* ``s = (hi - lo) / qmax`` stored as f16 (``s = 1`` is stored when the f16 scale is 0),
  ``z = clamp(rint(-lo / s16), 0, qmax)``, ``q = clamp(rint(w / s16) + z, 0, qmax)``;
* dequantized ``w' = (float32(q) - float32(z)) * float32(s16)`` in float32 (a single rounding);
* the packed weight dtypes ``u4`` / ``u3`` / ``u2`` (``b`` = 4 / 3 / 2 bits) store each row as a little-endian
  bit stream: element ``c`` in bits ``[b*c, b*c + b)`` (bit ``k`` of the row is bit ``k % 8`` of its byte
  ``k // 8``), every row starting on a byte, ``ceil(b * cols / 8)`` bytes per row, unused high bits zero
  (for ``u4``: two values per byte, the even-index element in the low nibble).

:data:`FORMATS` is the one table of expert formats on the Python side (the bundle code, the exporter, the CLI
and the benchmarks derive their dtype / bits tables from it; the library's is customops/src/formats.cc).

No torch here: this module runs on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = [
    "FORMATS",
    "ExpertFormat",
    "DTYPES",
    "BITS",
    "BITS_TO_DTYPE",
    "QUANTIZED_DTYPES",
    "TENSOR_DTYPE_BITS",
    "QuantizedMatrix",
    "quantize",
    "dequantize",
    "pack_bits",
    "unpack_bits",
    "pack_u4",
    "unpack_u4",
    "packed_row_bytes",
    "num_groups",
]


class ExpertFormat(NamedTuple):
    """One expert format (docs/bundle-format.md, "Quantization formats")."""

    #: manifest ``format.dtype``
    name: str
    #: bits per weight (< 8: packed rows)
    bits: int
    #: manifest dtype of the weight tensors
    tensor_dtype: str
    #: group-wise asymmetric (``scheme = "asym_u"``, ``.scales`` f16 and ``.zeros`` u8 tensors)
    quantized: bool


#: every expert format, in manifest order (the same rows as the library's table, customops/src/formats.cc)
FORMATS: tuple[ExpertFormat, ...] = (
    ExpertFormat("fp32", 32, "f32", False),
    ExpertFormat("fp16", 16, "f16", False),
    ExpertFormat("int8", 8, "u8", True),
    ExpertFormat("int4", 4, "u4", True),
    ExpertFormat("int3", 3, "u3", True),
    ExpertFormat("int2", 2, "u2", True),
)
DTYPES: tuple[str, ...] = tuple(f.name for f in FORMATS)
#: bits per weight of each dtype
BITS: dict[str, int] = {f.name: f.bits for f in FORMATS}
#: bits -> dtype (the exporter's ``--bits`` choices)
BITS_TO_DTYPE: dict[int, str] = {f.bits: f.name for f in FORMATS}
#: the group-wise quantized dtypes (int8, int4, int3, int2)
QUANTIZED_DTYPES: tuple[str, ...] = tuple(f.name for f in FORMATS if f.quantized)
#: bits per element of each manifest tensor dtype (``f32`` 32, ..., ``u2`` 2; < 8: packed)
TENSOR_DTYPE_BITS: dict[str, int] = {f.tensor_dtype: f.bits for f in FORMATS}
_QMAX: dict[str, int] = {f.name: (1 << f.bits) - 1 for f in FORMATS if f.quantized}
_F16_MAX = float(np.finfo(np.float16).max)
#: weights per chunk of rows that :func:`quantize` computes at once (bounds its float32 temporaries)
_CHUNK_ELEMENTS = 1 << 22


def num_groups(cols: int, group_size: int) -> int:
    """``G = ceil(cols / group_size)``."""
    return -(-cols // group_size)


def packed_row_bytes(cols: int, bits: int) -> int:
    """Bytes of one packed row of ``cols`` ``bits``-bit values: ``ceil(bits * cols / 8)``."""
    return -(-(bits * cols) // 8)


def _check_bits(fn: str, bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"{fn}: bits must be an int in [1, 8], found {bits!r}")
    return int(bits)


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack a ``[rows, cols]`` array of values in ``[0, 2^bits - 1]`` into ``[rows, ceil(bits * cols / 8)]``
    bytes: each row a little-endian bit stream, element ``c`` in bits ``[bits*c, bits*c + bits)``, unused
    high bits of a row's last byte zero. ``bits`` = 4 is :func:`pack_u4`.
    """
    bits = _check_bits("pack_bits", bits)
    q = np.asarray(q)
    if q.ndim != 2:
        raise ValueError(f"pack_bits: expected a 2-D array, found shape {q.shape}")
    qmax = (1 << bits) - 1
    if q.size and (q.min() < 0 or q.max() > qmax):
        raise ValueError(
            f"pack_bits: {bits}-bit values must be in [0, {qmax}], found [{q.min()}, {q.max()}]"
        )
    rows, cols = q.shape
    nb = packed_row_bytes(cols, bits)
    out = np.empty((rows, nb), np.uint8)
    if bits == 8:
        out[:] = q
        return out
    # In row chunks: the temporaries are a few bytes per weight of one chunk, not of the matrix.
    step = max(1, _CHUNK_ELEMENTS // max(1, cols))
    for r0 in range(0, rows, step):
        part = q[r0:r0 + step].astype(np.uint8)
        n = part.shape[0]
        if 8 % bits == 0:  # whole values per byte: byte j = OR_k value[per*j + k] << (bits*k)
            per = 8 // bits
            full = np.zeros((n, nb * per), np.uint8)
            full[:, :cols] = part
            acc = full[:, 0::per].copy()
            for k in range(1, per):
                acc |= full[:, k::per] << np.uint8(bits * k)
            out[r0:r0 + n] = acc
        else:  # 8 values fill exactly `bits` bytes: a (8 * bits)-bit word per 8 values, split into bytes
            n8 = -(-cols // 8)
            full = np.zeros((n, n8 * 8), np.uint64)
            full[:, :cols] = part
            g = full.reshape(n, n8, 8)
            word = np.zeros((n, n8), np.uint64)
            for j in range(8):
                word |= g[:, :, j] << np.uint64(bits * j)
            by = (word[:, :, None] >> (np.arange(bits, dtype=np.uint64) * np.uint64(8))) & np.uint64(0xFF)
            out[r0:r0 + n] = by.astype(np.uint8).reshape(n, n8 * bits)[:, :nb]
    return out


def unpack_bits(packed: np.ndarray, cols: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``[rows, ceil(bits * cols / 8)]`` bytes -> ``[rows, cols]`` uint8
    values."""
    bits = _check_bits("unpack_bits", bits)
    packed = np.asarray(packed, dtype=np.uint8)
    nb = packed_row_bytes(cols, bits)
    if packed.ndim != 2 or packed.shape[1] != nb:
        raise ValueError(
            f"unpack_bits: expected shape [rows, {nb}] for {cols} columns of {bits} bits, "
            f"found {packed.shape}"
        )
    rows = packed.shape[0]
    if bits == 8:
        return packed.copy()
    mask = np.uint8((1 << bits) - 1)
    if 8 % bits == 0:
        per = 8 // bits
        out = np.empty((rows, nb * per), np.uint8)
        for k in range(per):
            out[:, k::per] = (packed >> np.uint8(bits * k)) & mask
        return out[:, :cols]
    n8 = -(-cols // 8)
    full = np.zeros((rows, n8 * bits), np.uint64)
    full[:, :nb] = packed
    by = full.reshape(rows, n8, bits)
    word = np.zeros((rows, n8), np.uint64)
    for i in range(bits):
        word |= by[:, :, i] << np.uint64(8 * i)
    vals = (word[:, :, None] >> (np.arange(8, dtype=np.uint64) * np.uint64(bits))) & np.uint64(mask)
    return vals.astype(np.uint8).reshape(rows, n8 * 8)[:, :cols]


def pack_u4(q: np.ndarray) -> np.ndarray:
    """Pack a ``[rows, cols]`` array of values in ``[0, 15]`` into ``[rows, ceil(cols / 2)]`` bytes
    (:func:`pack_bits` with 4 bits): element ``2j`` goes to the low nibble of byte ``j``, element ``2j + 1``
    to the high nibble; a row of odd length is padded with a zero nibble.
    """
    return pack_bits(q, 4)


def unpack_u4(packed: np.ndarray, cols: int) -> np.ndarray:
    """Inverse of :func:`pack_u4`: ``[rows, ceil(cols / 2)]`` bytes -> ``[rows, cols]`` uint8 values."""
    return unpack_bits(packed, cols, 4)


@dataclass
class QuantizedMatrix:
    """One weight matrix ``[out, in]`` in one of :data:`DTYPES`.

    ``data``: fp32 -> float32 ``[out, in]``; fp16 -> float16 ``[out, in]``; int8 -> uint8 ``[out, in]``;
    int4 / int3 / int2 -> uint8 ``[out, ceil(bits * in / 8)]`` (packed, :func:`pack_bits`). ``scales``
    (float16) and ``zeros`` (uint8) are ``[out, G]`` for the quantized dtypes and ``None`` otherwise.
    ``group_size`` is 0 for fp32/fp16.
    """

    dtype: str
    shape: tuple[int, int]
    group_size: int
    data: np.ndarray
    scales: np.ndarray | None
    zeros: np.ndarray | None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        self.shape = (int(self.shape[0]), int(self.shape[1]))

    @property
    def bits(self) -> int:
        return BITS[self.dtype]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors (data + scales + zeros)."""
        n = int(self.data.nbytes)
        if self.scales is not None:
            n += int(self.scales.nbytes)
        if self.zeros is not None:
            n += int(self.zeros.nbytes)
        return n

    def dequantize(self) -> np.ndarray:
        return dequantize(self)


def _check_group_size(group_size: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise ValueError(f"group_size must be an int, found {type(group_size).__name__}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, found {group_size}")
    return int(group_size)


def quantize(w: np.ndarray, dtype: str, group_size: int = 64) -> QuantizedMatrix:
    """Quantize a 2-D weight matrix ``[out, in]`` (nn.Linear layout) to ``dtype``.

    ``group_size`` is validated for every dtype but only used by the quantized ones (int8, int4, int3, int2;
    ``QuantizedMatrix.group_size`` is 0 for fp32/fp16).
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    group_size = _check_group_size(group_size)
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight matrix [out, in], found shape {w.shape}")
    if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
        raise ValueError(f"expected a real-valued weight matrix, found dtype {w.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        w32 = np.ascontiguousarray(w, dtype=np.float32)
    if not np.isfinite(w32).all():
        bad = np.argwhere(~np.isfinite(w32))[0]
        raise ValueError(
            f"weights must be finite (and fit float32): found {w.flat[np.ravel_multi_index(bad, w.shape)]!r} "
            f"at [{bad[0]}, {bad[1]}]"
        )
    shape = (int(w32.shape[0]), int(w32.shape[1]))

    if dtype == "fp32":
        return QuantizedMatrix("fp32", shape, 0, w32, None, None)
    if dtype == "fp16":
        if w32.size and float(np.abs(w32).max()) > _F16_MAX:
            raise ValueError(f"weights exceed the float16 range (max |w| = {float(np.abs(w32).max())!r})")
        with np.errstate(over="raise"):
            w16 = w32.astype(np.float16)
        if not np.isfinite(w16).all():
            raise ValueError("weights round to inf in float16")
        return QuantizedMatrix("fp16", shape, 0, w16, None, None)

    qmax = _QMAX[dtype]
    rows, cols = shape
    g = num_groups(cols, group_size)
    pad = g * group_size - cols
    # Rows are quantized in chunks of ~_CHUNK_ELEMENTS weights: the float32 temporaries of one chunk, not of
    # the matrix (an 8x7B expert's w_in is 117 M weights); every step is elementwise or per group, so the
    # result is the same as in one piece.
    step = max(1, _CHUNK_ELEMENTS // max(1, g * group_size))

    def groups(r0: int, r1: int) -> np.ndarray:
        # Padding with zeros does not move lo/hi: the range always contains 0.
        part = np.pad(w32[r0:r1], ((0, 0), (0, pad))) if pad else w32[r0:r1]
        return part.reshape(r1 - r0, g, group_size)

    lo = np.zeros((rows, g), np.float32)
    hi = np.zeros((rows, g), np.float32)
    if cols:
        for r0 in range(0, rows, step):
            wg = groups(r0, min(rows, r0 + step))
            lo[r0:r0 + step] = np.minimum(wg.min(axis=2), np.float32(0))
            hi[r0:r0 + step] = np.maximum(wg.max(axis=2), np.float32(0))
    s = (hi - lo) / np.float32(qmax)  # float32
    if s.size and float(s.max()) > _F16_MAX:
        raise ValueError(
            f"weight range too large for a float16 scale: (hi - lo) / {qmax} = {float(s.max())!r} "
            f"> {_F16_MAX}"
        )
    s16 = s.astype(np.float16)
    s16[s16 == 0] = np.float16(1.0)
    s32 = s16.astype(np.float32)
    z = np.clip(np.rint(-lo / s32), 0, qmax).astype(np.float32)
    q = np.empty((rows, cols), np.uint8)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        qc = np.clip(np.rint(groups(r0, r1) / s32[r0:r1, :, None]) + z[r0:r1, :, None], 0, qmax)
        q[r0:r1] = qc.astype(np.uint8).reshape(r1 - r0, g * group_size)[:, :cols]
    zeros = z.astype(np.uint8)
    bits = BITS[dtype]
    data = pack_bits(q, bits) if bits < 8 else np.ascontiguousarray(q)
    return QuantizedMatrix(dtype, shape, group_size, data, s16, zeros)


def dequantize(qm: QuantizedMatrix) -> np.ndarray:
    """Dequantized float32 ``[out, in]`` matrix: ``(float32(q) - float32(z)) * float32(s16)``."""
    rows, cols = qm.shape
    if qm.dtype == "fp32":
        return np.asarray(qm.data, dtype=np.float32).reshape(rows, cols)
    if qm.dtype == "fp16":
        return np.asarray(qm.data, dtype=np.float16).reshape(rows, cols).astype(np.float32)
    if qm.dtype not in _QMAX:
        raise ValueError(f"unknown dtype {qm.dtype!r}; expected one of {', '.join(DTYPES)}")
    if qm.scales is None or qm.zeros is None:
        raise ValueError(f"{qm.dtype} matrix needs scales and zeros")
    gs = _check_group_size(qm.group_size)
    g = num_groups(cols, gs)
    bits = BITS[qm.dtype]
    if bits < 8:
        q = unpack_bits(qm.data, cols, bits)
    else:
        q = np.asarray(qm.data, dtype=np.uint8).reshape(rows, cols)
    s = np.asarray(qm.scales, dtype=np.float16).reshape(rows, g).astype(np.float32)
    z = np.asarray(qm.zeros, dtype=np.uint8).reshape(rows, g).astype(np.float32)
    s_full = np.repeat(s, gs, axis=1)[:, :cols]
    z_full = np.repeat(z, gs, axis=1)[:, :cols]
    return (q.astype(np.float32) - z_full) * s_full
