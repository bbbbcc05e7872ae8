"""Dense quantization: the dense graph's weights in fewer bits, through ONNX Runtime's own ops.

``--dense-bits`` (docs/bundle-format.md, "Dense weights"):

* ``32``: the graph as traced (float32);
* ``16``: every weight of a :data:`~edgemoe_ort.bundle.dense.QUANTIZED_KINDS` kind stored as float16, with a
  ``Cast`` to float32 in front of its users: half the bytes on disk. ORT's CPU kernels compute in float32 and
  its constant folding turns each ``Cast`` back into a float32 weight when the session is created, so the
  process holds them in float32;
* ``8`` / ``4``: every such weight block-quantized (:mod:`edgemoe_ort.quant.nbits`): a ``MatMul`` / ``Gemm``
  with a constant weight becomes ``com.microsoft.MatMulNBits``, an embedding ``Gather`` becomes
  ``com.microsoft.GatherBlockQuantized``. A weight one of whose users cannot be converted is left in float32,
  and the report says why.

Routers and shared-expert gates (kind ``gate``) stay float32 at every setting: they are a fraction of a
percent of the bytes, and a changed expert choice changes which experts are read. Norms and everything
unlabelled stay float32.

Runs on an in-memory ``ModelProto`` (the exporter's, before it is written); no torch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgemoe_ort.bundle.dense import (
    KINDS,
    QUANTIZED_KINDS,
    bytes_by_kind,
    initializer_kinds,
    node_kind,
    set_node_kind,
)
from edgemoe_ort.quant.nbits import (
    DEFAULT_DENSE_BITS,
    DEFAULT_DENSE_BLOCK_SIZE,
    DENSE_ACCURACY_LEVEL,
    DENSE_BITS,
    BlockQuantized,
    block_quantize,
    is_valid_block_size,
)

__all__ = [
    "DEFAULT_DENSE_BITS",
    "DEFAULT_DENSE_BLOCK_SIZE",
    "DENSE_ACCURACY_LEVEL",
    "DENSE_BITS",
    "DenseQuantReport",
    "check_dense_options",
    "quantize_dense",
]

_MS_DOMAIN = "com.microsoft"
_FLOAT = onnx.TensorProto.FLOAT


def check_dense_options(bits: int, block_size: int) -> None:
    """Raise ValueError naming the option when ``bits`` / ``block_size`` are not ones this module takes."""
    if isinstance(bits, bool) or bits not in DENSE_BITS:
        raise ValueError(f"dense bits: expected one of {', '.join(map(str, DENSE_BITS))}, found {bits!r}")
    if not is_valid_block_size(block_size):
        raise ValueError(
            f"dense group size: expected a power of two >= 16 (ORT's MatMulNBits), found {block_size!r}"
        )


@dataclass
class DenseQuantReport:
    """What :func:`quantize_dense` did to one graph."""

    bits: int
    block_size: int
    bytes_before: dict[str, int] = field(default_factory=dict)
    bytes_after: dict[str, int] = field(default_factory=dict)
    weights: Counter[str] = field(default_factory=Counter)  # converted weights per kind
    skipped: list[str] = field(default_factory=list)  # "<initializer> (<kind>): <why>"

    def summary(self) -> list[str]:
        """Lines for the export log: bytes per kind before -> after, then what was left and why."""
        if self.bits == 32:
            return []
        lines = [] if sum(self.weights.values()) else [
            "no weight was converted: the graph has no weight-kind labels (edgemoe.weight_kind) or none of a "
            "quantized kind"]
        for k in KINDS:
            before, after = self.bytes_before.get(k, 0), self.bytes_after.get(k, 0)
            if before or after:
                lines.append(
                    f"{k}: {before / 2**20:.2f} -> {after / 2**20:.2f} MiB"
                    + (f" ({self.weights[k]} weights)" if self.weights[k] else "")
                )
        lines.extend(f"left in float32: {s}" for s in self.skipped)
        return lines


def _by_kind(graph: onnx.GraphProto) -> dict[str, int]:
    out = dict.fromkeys(KINDS, 0)
    out.update({k: sum(formats.values()) for k, formats in bytes_by_kind(graph).items()})
    return out


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


@dataclass
class _Use:
    """One user of a weight and how it becomes a quantized op."""

    node: onnx.NodeProto
    how: str  # "matmul" (weight [K, N]), "matmul_t" (weight [N, K]), "gather"
    bias: str = ""
    drop: tuple[onnx.NodeProto, ...] = ()  # nodes that go away with it (a Transpose in front of MatMuls)

    def kind(self, default: str) -> str:
        """The use's own label (a tied head's MatMul: its Transpose's), else the weight's kind."""
        for n in (self.node, *self.drop):
            found = node_kind(n)
            if found is not None:
                return found
        return default


def _plan(
    name: str,
    graph_inits: dict[str, onnx.TensorProto],
    consumers: dict[str, list[onnx.NodeProto]],
    n_cols: int,
    block_size: int,
) -> list[_Use] | str:
    """How every user of weight ``name`` is converted, or why one cannot be."""
    uses: list[_Use] = []
    for node in consumers.get(name, []):
        op = node.op_type
        if op == "MatMul" and list(node.input).index(name) == 1 and node.input[0] != name:
            uses.append(_Use(node, "matmul"))
        elif op == "Transpose" and list(_attr(node, "perm", [1, 0])) == [1, 0]:  # type: ignore[arg-type]
            users = consumers.get(node.output[0], [])
            if not users or any(
                u.op_type != "MatMul" or u.input[1] != node.output[0] or u.input[0] == node.output[0]
                for u in users
            ):
                return f"its Transpose {node.name!r} feeds something other than MatMul weights"
            uses.extend(_Use(u, "matmul_t", drop=(node,)) for u in users)
        elif op == "Gemm" and node.input[1] == name and node.input[0] != name:
            if (
                _attr(node, "transA", 0)
                or _attr(node, "alpha", 1.0) != 1.0
                or _attr(node, "beta", 1.0) != 1.0
            ):
                return f"Gemm {node.name!r} has transA / alpha / beta"
            bias = node.input[2] if len(node.input) > 2 else ""
            if bias:
                b = graph_inits.get(bias)
                if b is None or len(b.dims) != 1:
                    return f"Gemm {node.name!r} has a bias that is not a constant vector"
            uses.append(_Use(node, "matmul_t" if _attr(node, "transB", 0) else "matmul", bias=bias))
        elif op == "Gather" and node.input[0] == name and _attr(node, "axis", 0) == 0:
            if n_cols % block_size:
                return f"an embedding of {n_cols} columns, not a multiple of the block size {block_size}"
            uses.append(_Use(node, "gather"))
        else:
            return f"used by {op} {node.name!r}"
    if not uses:
        return "not used"
    return uses


def _matmul_nbits(
    use: _Use, q: BlockQuantized, names: tuple[str, str, str], accuracy_level: int, kind: str
) -> onnx.NodeProto:
    inputs = [use.node.input[0], *names]
    if use.bias:
        inputs += ["", use.bias]  # g_idx (deprecated) unset, then the bias
    new = helper.make_node(
        "MatMulNBits",
        inputs,
        list(use.node.output),
        name=use.node.name,
        domain=_MS_DOMAIN,
        K=q.cols,
        N=q.rows,
        bits=q.bits,
        block_size=q.block_size,
        accuracy_level=accuracy_level,
    )
    new.metadata_props.extend(use.node.metadata_props)
    set_node_kind(new, kind)  # a tied head's MatMul was labelled through its Transpose only
    return new


def _gather(use: _Use, q: BlockQuantized, names: tuple[str, str, str]) -> onnx.NodeProto:
    new = helper.make_node(
        "GatherBlockQuantized",
        [names[0], use.node.input[1], names[1], names[2]],
        list(use.node.output),
        name=use.node.name,
        domain=_MS_DOMAIN,
        bits=q.bits,
        block_size=q.block_size,
        gather_axis=0,
        quantize_axis=1,
    )
    new.metadata_props.extend(use.node.metadata_props)
    return new


def _to_fp16(graph: onnx.GraphProto, kinds: dict[str, str], report: DenseQuantReport) -> None:
    casts = []
    keep = []
    for t in graph.initializer:
        kind = kinds[t.name]
        if kind in QUANTIZED_KINDS and t.data_type == _FLOAT and len(t.dims) == 2:
            w = numpy_helper.to_array(t)
            if not np.isfinite(w.astype(np.float16)).all():
                report.skipped.append(f"{t.name} ({kind}): values beyond the float16 range")
                keep.append(t)
                continue
            half = numpy_helper.from_array(w.astype(np.float16), f"{t.name}_fp16")
            keep.append(half)
            cast = helper.make_node("Cast", [half.name], [t.name], name=f"{t.name}_cast", to=_FLOAT)
            set_node_kind(cast, kind)
            casts.append(cast)
            report.weights[kind] += 1
        else:
            keep.append(t)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = [*casts, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)


def quantize_dense(
    model: onnx.ModelProto,
    *,
    bits: int,
    block_size: int = DEFAULT_DENSE_BLOCK_SIZE,
    accuracy_level: int = DENSE_ACCURACY_LEVEL,
) -> DenseQuantReport:
    """Rewrite ``model``'s main graph in place so its dense weights take ``bits`` (module docstring).

    The weights' kinds are the exporter's labels (:mod:`edgemoe_ort.bundle.dense`); a graph without labels
    is left as it is. Returns the bytes per kind before and after, and every weight left in float32 with why.
    """
    check_dense_options(bits, block_size)
    g = model.graph
    report = DenseQuantReport(bits, block_size, bytes_before=_by_kind(g))
    if bits == 32:
        report.bytes_after = dict(report.bytes_before)
        return report
    kinds = initializer_kinds(g)
    if bits == 16:
        _to_fp16(g, kinds, report)
        report.bytes_after = _by_kind(g)
        return report

    inits = {t.name: t for t in g.initializer}
    nodes = list(g.node)  # held, so that id() names one node until the graph is rebuilt from this list
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for i in node.input:
            if i:
                consumers.setdefault(i, []).append(node)
    replace: dict[int, onnx.NodeProto] = {}  # id(old node) -> new node
    drop: set[int] = set()
    new_inits: list[onnx.TensorProto] = []
    have: set[str] = set()  # their names
    removed: set[str] = set()
    for t in list(g.initializer):
        kind = kinds[t.name]
        if kind not in QUANTIZED_KINDS or t.data_type != _FLOAT or len(t.dims) != 2:
            continue
        plan = _plan(t.name, inits, consumers, int(t.dims[1]), block_size)
        if isinstance(plan, str):
            report.skipped.append(f"{t.name} ({kind}): {plan}")
            continue
        w = numpy_helper.to_array(t)
        done: dict[str, tuple[tuple[str, str, str], BlockQuantized]] = {}  # by orientation
        try:  # a range no f16 scale holds: that weight stays float32, the export goes on
            for key in dict.fromkeys("kn" if u.how == "matmul" else "nk" for u in plan):  # [K, N]: transposed
                q = block_quantize(w.T if key == "kn" else w, bits, block_size)
                done[key] = (
                    (f"{t.name}_q{bits}{key}", f"{t.name}_q{bits}{key}_scales", f"{t.name}_q{bits}{key}_zp"),
                    q,
                )
        except ValueError as exc:
            report.skipped.append(f"{t.name} ({kind}): {exc}")
            continue
        for use in plan:
            key = "kn" if use.how == "matmul" else "nk"
            names, q = done[key]
            tag = f"{names[0]}_gather" if use.how == "gather" else names[0]
            for a, n in ((None, tag), (q.scales, names[1]), (q.zero_points, names[2])):
                if n not in have:
                    if a is None:
                        a = q.gather_data() if use.how == "gather" else q.matmul_b
                    new_inits.append(numpy_helper.from_array(a, n))
                    have.add(n)
            names = (tag, names[1], names[2])
            if use.how == "gather":
                replace[id(use.node)] = _gather(use, q, names)
            else:
                replace[id(use.node)] = _matmul_nbits(use, q, names, accuracy_level, use.kind(kind))
            drop.update(id(n) for n in use.drop)
        removed.add(t.name)
        report.weights[kind] += 1

    dropped_outputs = {o for n in nodes if id(n) in drop for o in n.output}
    rebuilt = [replace.get(id(n), n) for n in nodes if id(n) not in drop]
    del g.node[:]
    g.node.extend(rebuilt)
    keep = [t for t in g.initializer if t.name not in removed]
    del g.initializer[:]
    g.initializer.extend([*keep, *new_inits])
    stale = removed | dropped_outputs
    vi = [v for v in g.value_info if v.name not in stale]
    del g.value_info[:]
    g.value_info.extend(vi)
    if replace and not any(o.domain == _MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_MS_DOMAIN, 1))
    report.bytes_after = _by_kind(g)
    return report
