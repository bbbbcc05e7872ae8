"""Dense weights in ONNX Runtime's own block-quantized layouts: ``com.microsoft.MatMulNBits`` and
``com.microsoft.GatherBlockQuantized`` (docs/bundle-format.md, "Dense weights").

The arithmetic is :func:`edgemoe_ort.quant.quantize`'s (int4 / int8, asymmetric unsigned, f16 scales, u8
zero points, groups along the input dimension), so a dense weight and an expert quantized at the same bits and
group size dequantize to the same numbers; only the byte layout differs:

* ``MatMulNBits`` (weight ``[N, K]``, nn.Linear layout): ``B`` uint8 ``[N, ceil(K / bs), bs * bits / 8]``,
  each block packed along K (int4: even element in the low nibble), the tail of the last block filled with the
  block's zero point (it dequantizes to 0); ``scales`` float32 ``[N, k_blocks]``; ``zero_points`` uint8,
  ``[N, ceil(k_blocks / 2)]`` packed the same way for int4, ``[N, k_blocks]`` for int8.
* ``GatherBlockQuantized`` (table ``[V, H]``, quantized along H, gathered along V): ``data`` uint8
  ``[V, ceil(H / 2)]`` (int4) or ``[V, H]`` (int8), scales and zero points as above. ORT requires H to be a
  multiple of the block size here.

ORT's dequantization ``(q - z) * s`` is exact in float32, so ``reference()`` is what the ops compute with (a
MatMul at ``accuracy_level`` 0 then differs from ``x @ reference().T`` only by float32 summation order).

No torch here: the graph rewrite that uses this runs on the host and on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgemoe_ort.quant import dequantize, num_groups, pack_u4, quantize, unpack_u4

__all__ = [
    "DEFAULT_DENSE_BITS",
    "DEFAULT_DENSE_BLOCK_SIZE",
    "DENSE_ACCURACY_LEVEL",
    "DENSE_BITS",
    "NBITS_DTYPES",
    "BlockQuantized",
    "block_quantize",
    "is_valid_block_size",
]

#: the ``--dense-bits`` values
DENSE_BITS: tuple[int, ...] = (32, 16, 8, 4)
#: the exporter's default (docs/bundle-format.md, "Dense weights", says why)
DEFAULT_DENSE_BITS = 32
#: the exporter's default block size along the input dimension (llama.cpp's Q4_0 / Q8_0 use 32)
DEFAULT_DENSE_BLOCK_SIZE = 32
#: MatMulNBits' ``accuracy_level``: 4 = the activations are quantized to int8 per block inside the op (3x
#: faster than 0 for int4 and 30x for int8 on x86-64 here; docs/quality.md measures what it costs)
DENSE_ACCURACY_LEVEL = 4

#: bits -> the :mod:`edgemoe_ort.quant` dtype with that arithmetic
NBITS_DTYPES: dict[int, str] = {4: "int4", 8: "int8"}


def is_valid_block_size(block_size: int) -> bool:
    """ORT's rule for both ops: a power of two >= 16."""
    return (
        isinstance(block_size, int)
        and not isinstance(block_size, bool)
        and block_size >= 16
        and block_size & (block_size - 1) == 0
    )


@dataclass
class BlockQuantized:
    """One weight ``[rows, cols]`` quantized block-wise along ``cols``, in both ORT layouts' pieces."""

    bits: int
    block_size: int
    rows: int
    cols: int
    matmul_b: np.ndarray  # uint8 [rows, k_blocks, block_size * bits / 8]
    scales: np.ndarray  # float32 [rows, k_blocks]
    zero_points: np.ndarray  # uint8, packed for int4
    _reference: np.ndarray | None = None

    @property
    def k_blocks(self) -> int:
        return num_groups(self.cols, self.block_size)

    def gather_data(self) -> np.ndarray:
        """``GatherBlockQuantized``'s ``data`` (requires ``cols % block_size == 0``)."""
        if self.cols % self.block_size:
            raise ValueError(
                f"GatherBlockQuantized needs {self.cols} columns to be a multiple of the block "
                f"size {self.block_size}"
            )
        return self.matmul_b.reshape(self.rows, -1)

    def reference(self) -> np.ndarray:
        """The float32 ``[rows, cols]`` weight both ops dequantize to."""
        if self._reference is None:
            raise ValueError("reference() is only kept by block_quantize(..., keep_reference=True)")
        return self._reference


def block_quantize(
    w: np.ndarray, bits: int, block_size: int, *, keep_reference: bool = False
) -> BlockQuantized:
    """Quantize ``w`` ``[rows, cols]`` (float) to ``bits`` (4 or 8) in blocks of ``block_size`` along cols."""
    if bits not in NBITS_DTYPES:
        raise ValueError(f"bits: expected one of {sorted(NBITS_DTYPES)}, found {bits!r}")
    if not is_valid_block_size(block_size):
        raise ValueError(f"block size: expected a power of two >= 16, found {block_size!r}")
    qm = quantize(np.asarray(w), NBITS_DTYPES[bits], block_size)
    rows, cols = qm.shape
    kb = num_groups(cols, block_size)
    q = unpack_u4(qm.data, cols) if bits == 4 else qm.data
    full = np.repeat(qm.zeros, block_size, axis=1)  # the tail of the last block: its zero point (= 0.0)
    full[:, :cols] = q
    if bits == 4:
        b = pack_u4(full.reshape(rows * kb, block_size)).reshape(rows, kb, block_size // 2)
        zp = pack_u4(qm.zeros)
    else:
        b = full.reshape(rows, kb, block_size)
        zp = np.ascontiguousarray(qm.zeros)
    assert qm.scales is not None
    return BlockQuantized(
        bits,
        block_size,
        rows,
        cols,
        np.ascontiguousarray(b),
        qm.scales.astype(np.float32),
        zp,
        dequantize(qm) if keep_reference else None,
    )
