"""Numpy reference quantizer / dequantizer for expert weights (docs/bundle-format.md, "Quantization formats").

The C++ kernels are tested bit-for-bit against :func:`dequantize`, so the arithmetic here follows the spec
literally:

* the input is converted to float32 first and every quantization step is computed in float32;
* group-wise asymmetric unsigned quantization along the input dimension (``scheme = "asym_u"``), groups of
  ``group_size`` consecutive weights of one row, the last group of a row may be shorter;
* ``s = (hi - lo) / qmax`` stored as f16 (``s = 1`` is stored when the f16 scale is 0),
  ``z = clamp(rint(-lo / s16), 0, qmax)``, ``q = clamp(rint(w / s16) + z, 0, qmax)``;
* dequantized ``w' = (float32(q) - float32(z)) * float32(s16)`` in float32 (a single rounding);
* ``u4`` packs two values per byte, the even-index element in the low nibble, every row byte-aligned.

No torch here: this module runs on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "DTYPES",
    "BITS",
    "QuantizedMatrix",
    "quantize",
    "dequantize",
    "pack_u4",
    "unpack_u4",
    "num_groups",
]

DTYPES: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")
#: bits per weight of each dtype (reserved planner names int2/int3 are not implemented).
BITS: dict[str, int] = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}
_QMAX: dict[str, int] = {"int8": 255, "int4": 15}
_F16_MAX = float(np.finfo(np.float16).max)
#: weights per chunk of rows that :func:`quantize` computes at once (bounds its float32 temporaries)
_CHUNK_ELEMENTS = 1 << 22


def num_groups(cols: int, group_size: int) -> int:
    """``G = ceil(cols / group_size)``."""
    return -(-cols // group_size)


def pack_u4(q: np.ndarray) -> np.ndarray:
    """Pack a ``[rows, cols]`` array of values in ``[0, 15]`` into ``[rows, ceil(cols / 2)]`` bytes.

    Element ``2j`` goes to the low nibble of byte ``j``, element ``2j + 1`` to the high nibble; a row of odd
    length is padded with a zero nibble.
    """
    q = np.asarray(q)
    if q.ndim != 2:
        raise ValueError(f"pack_u4: expected a 2-D array, found shape {q.shape}")
    if q.size and (q.min() < 0 or q.max() > 15):
        raise ValueError(f"pack_u4: values must be in [0, 15], found [{q.min()}, {q.max()}]")
    q = q.astype(np.uint8)
    rows, cols = q.shape
    if cols % 2:
        q = np.concatenate([q, np.zeros((rows, 1), np.uint8)], axis=1)
    return np.ascontiguousarray(q[:, 0::2] | (q[:, 1::2] << 4))


def unpack_u4(packed: np.ndarray, cols: int) -> np.ndarray:
    """Inverse of :func:`pack_u4`: ``[rows, ceil(cols / 2)]`` bytes -> ``[rows, cols]`` uint8 values."""
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.ndim != 2 or packed.shape[1] != (cols + 1) // 2:
        raise ValueError(
            f"unpack_u4: expected shape [rows, {(cols + 1) // 2}] for {cols} columns, found {packed.shape}"
        )
    out = np.empty((packed.shape[0], packed.shape[1] * 2), np.uint8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out[:, :cols]


@dataclass
class QuantizedMatrix:
    """One weight matrix ``[out, in]`` in one of :data:`DTYPES`.

    ``data``: fp32 -> float32 ``[out, in]``; fp16 -> float16 ``[out, in]``; int8 -> uint8 ``[out, in]``;
    int4 -> uint8 ``[out, ceil(in / 2)]`` (packed). ``scales`` (float16) and ``zeros`` (uint8) are
    ``[out, G]`` for int8/int4 and ``None`` otherwise. ``group_size`` is 0 for fp32/fp16.
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

    ``group_size`` is validated for every dtype but only used by int8/int4 (``QuantizedMatrix.group_size``
    is 0 for fp32/fp16).
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
    data = pack_u4(q) if dtype == "int4" else np.ascontiguousarray(q)
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
    if qm.dtype == "int4":
        q = unpack_u4(qm.data, cols)
    else:
        q = np.asarray(qm.data, dtype=np.uint8).reshape(rows, cols)
    s = np.asarray(qm.scales, dtype=np.float16).reshape(rows, g).astype(np.float32)
    z = np.asarray(qm.zeros, dtype=np.uint8).reshape(rows, g).astype(np.float32)
    s_full = np.repeat(s, gs, axis=1)[:, :cols]
    z_full = np.repeat(z, gs, axis=1)[:, :cols]
    return (q.astype(np.float32) - z_full) * s_full
