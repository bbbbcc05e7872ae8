"""Fitted probes in a decoder graph: the prefetcher's prediction signals computed by linear maps fitted to the
layers' own routers instead of by the routers themselves (docs/bundle-format.md, "profile.json",
``probes``; docs/op-contract.md, "Fitted probes").

Two kinds of *site* apply a later layer's router to an earlier hidden state:

- ``residual``: the ``scores`` of the ``ResidualPrefetch`` node of layer ``t`` (:mod:`.residual`),
  ``Softmax(router_t(x))`` with ``x`` = ``t``'s normalization of the residual stream *before* ``t``'s
  attention;
- ``gates``: row ``j`` of the stacked gates of ``OffloadedExpert`` node ``l`` (input 3, :mod:`.wiring`),
  ``router_{l+1+j}(x)`` with ``x`` = node ``l``'s input.

Each router was trained on its own layer's input, so on an earlier state its guess misses what the layers
between add. A probe ``(W [H, E], b [E])`` fitted by least squares from ``x`` to the target layer's real
router logits (``edgemoe-profile`` fits it: :mod:`edgemoe_ort.profile.probe`) predicts that: the site then
computes ``x @ W + b`` instead of ``router(x)``.

- :func:`probe_sites`: every site of a graph, the tensors a fit needs (``x``, the target's router logits) and
  the router itself (the baseline);
- :func:`install_probe`: one site's ``MatMul`` (+ bias) replaced by ``MatMul(x, W) + b`` with the
  initializers ``edgemoe_probe_<site>_weight`` / ``_bias``; a second install replaces their values only;
- :func:`install_probes`: the same on a graph file (tmp + rename; external weights are only referenced).

Only the prefetcher reads these signals: the model's outputs do not change. Torch-free (onnx + numpy).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import DOMAIN, GraphIndex, insert_nodes, node_attrs
from .wiring import NEXT_LOGITS_INPUT, Router, _find_router

__all__ = [
    "PROBE_PREFIX",
    "PROBE_KINDS",
    "Probe",
    "ProbeSite",
    "probe_name",
    "probe_sites",
    "install_probe",
    "install_probes",
]

#: prefix of the initializers and nodes a probe adds
PROBE_PREFIX = "edgemoe_probe"
#: the kinds of site (module docstring)
PROBE_KINDS = ("residual", "gates")
_RESIDUAL = "ResidualPrefetch"
_OFFLOADED = "OffloadedExpert"
_ONNX = ("", "ai.onnx")


def probe_name(kind: str, node: int, layer: int) -> str:
    """The name stem of a site's initializers: ``edgemoe_probe_residual_l3``, ``..._gates_n0_l2``."""
    return (
        f"{PROBE_PREFIX}_{kind}_l{layer}" if kind == "residual" else f"{PROBE_PREFIX}_{kind}_n{node}_l{layer}"
    )


@dataclass(frozen=True)
class Probe:
    """A fitted probe of one site (``kind``, ``node``, ``layer``: see :class:`ProbeSite`):
    ``logits = x @ weight + bias``."""

    kind: str
    node: int
    layer: int
    weight: np.ndarray  #: float32 ``[H, E]``
    bias: np.ndarray  #: float32 ``[E]``

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.kind, self.node, self.layer)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """``x @ weight + bias`` for ``x`` ``[N, H]`` (float64)."""
        return np.asarray(x, np.float64) @ self.weight.astype(np.float64) + self.bias.astype(np.float64)


@dataclass(frozen=True)
class ProbeSite:
    """Where a probe goes, and what its fit reads (graph tensor names)."""

    kind: str  #: ``residual`` or ``gates``
    node: int  #: the ``layer`` of the node whose signal it is (ResidualPrefetch: = ``layer``)
    layer: int  #: the layer whose router it predicts
    features: str  #: ``x`` ``[T, H]``
    target: str  #: the target layer's own router logits (``[..., E]``): what the probe is fitted to
    logits: str  #: the tensor the site computes now from ``x`` (its readers get the probe's instead)
    hidden: int
    num_experts: int
    #: the router itself as a probe (the baseline a fit is compared with); None when not asked for
    router: Probe | None = None

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.kind, self.node, self.layer)


def _const(g: GraphIndex, name: str | None) -> np.ndarray | None:
    t = g.constant(name) if name else None
    return None if t is None else numpy_helper.to_array(t)


def _router_probe(g: GraphIndex, key: tuple[str, int, int], router: Router) -> Probe | str:
    """The router as ``x @ W + b``, or why its weights are not readable here (external data not loaded)."""
    w = _const(g, router.weight)
    if w is None or w.size == 0:
        return f"the router weight {router.weight!r} is not loaded"
    w = w.astype(np.float64)
    E = int(router.num_experts)
    b = np.zeros(E, np.float64)
    if router.bias:
        bv = _const(g, router.bias)
        if bv is None:
            return f"the router bias {router.bias!r} is not loaded"
        b = bv.astype(np.float64).reshape(E)
    if router.op == "Gemm":
        if router.trans_b:
            w = w.T
        w = w * router.alpha
        b = b * router.beta
    return Probe(*key, w.astype(np.float32), b.astype(np.float32))


def _router_output(g: GraphIndex, router: Router) -> str | None:
    """The tensor of the router's logits: the Gemm's output, the MatMul's, or its bias Add's."""
    from .residual import _find_node

    node = _find_node(g, router.node)
    if node is None:
        return None
    out = node.output[0]
    if router.op == "MatMul" and router.bias:
        adds = [c for c in g.consumers.get(out, []) if c.op_type == "Add" and c.domain in _ONNX]
        if len(adds) != 1:
            return None
        out = adds[0].output[0]
    return out


def _linear(g: GraphIndex, logits: str) -> tuple[str, list[onnx.NodeProto]] | str:
    """``(x, nodes)``: ``logits`` = ``MatMul`` / ``Gemm`` of ``x`` by a constant (+ a constant), or why
    not."""
    chain: list[onnx.NodeProto] = []
    cur = g.producer.get(logits)
    while cur is not None and len(chain) < 2:
        chain.append(cur)
        if cur.op_type in ("MatMul", "Gemm") and cur.domain in _ONNX and len(cur.input) > 1:
            if g.constant(cur.input[1]) is None:
                break
            return cur.input[0], chain
        if cur.op_type != "Add" or cur.domain not in _ONNX:
            break
        data = [i for i in cur.input if g.constant(i) is None]
        if len(data) != 1:
            break
        cur = g.producer.get(data[0])
    return "not MatMul / Gemm (+ Add) of one tensor by constants"


def _signals(g: GraphIndex, model: onnx.ModelProto) -> tuple[list[tuple[str, int, int, str]], list[str]]:
    """``(kind, node, layer, logits)`` of every site of the graph, and notes on the nodes that have none."""
    out: list[tuple[str, int, int, str]] = []
    notes: list[str] = []
    for n in model.graph.node:
        if n.domain != DOMAIN:
            continue
        layer = int(node_attrs(n).get("layer", -1))
        if n.op_type == _RESIDUAL:
            sm = g.producer.get(n.input[1]) if len(n.input) > 1 else None
            if sm is None or sm.op_type != "Softmax" or sm.domain not in _ONNX:
                notes.append(f"{_RESIDUAL} layer {layer}: no probe: its scores are not a Softmax")
                continue
            out.append(("residual", layer, layer, sm.input[0]))
        elif n.op_type == _OFFLOADED and len(n.input) > NEXT_LOGITS_INPUT and n.input[NEXT_LOGITS_INPUT]:
            rs = g.producer.get(n.input[NEXT_LOGITS_INPUT])
            if rs is None or rs.op_type != "Reshape" or rs.domain not in _ONNX:
                notes.append(f"{_OFFLOADED} layer {layer}: no probe: its stacked gates are not a Reshape")
                continue
            cat = g.producer.get(rs.input[0])
            rows = list(cat.input) if cat is not None and cat.op_type == "Concat" else [rs.input[0]]
            out += [("gates", layer, layer + 1 + j, r) for j, r in enumerate(rows)]
    return out, notes


def probe_sites(model: onnx.ModelProto, baseline: bool = True) -> tuple[list[ProbeSite], list[str]]:
    """Every :class:`ProbeSite` of ``model`` (sorted by kind, node, layer) and a note for each signal that
    cannot take a probe. ``baseline``: read each router's weights into :attr:`ProbeSite.router` (``model``
    must have its external data loaded)."""
    g = GraphIndex(model.graph)
    offloaded = {
        int(node_attrs(n).get("layer", -1)): n
        for n in model.graph.node
        if n.op_type == _OFFLOADED and n.domain == DOMAIN
    }
    signals, notes = _signals(g, model)
    sites: list[ProbeSite] = []
    for kind, node, layer, logits in signals:
        where = f"{kind} node {node} -> layer {layer}"
        chain = _linear(g, logits)
        if isinstance(chain, str):
            notes.append(f"{where}: no probe: {chain}")
            continue
        router, why = _find_router(g, offloaded[layer]) if layer in offloaded else (None, "no such layer")
        if router is None:
            notes.append(f"{where}: no probe: router not found ({why})")
            continue
        target = _router_output(g, router)
        base = _router_probe(g, (kind, node, layer), router) if baseline else None
        if target is None or isinstance(base, str):
            notes.append(f"{where}: no probe: {base if isinstance(base, str) else 'router output not found'}")
            continue
        x = chain[0]
        sites.append(ProbeSite(kind, node, layer, x, target, logits, router.hidden, router.num_experts, base))
    sites.sort(key=lambda s: (PROBE_KINDS.index(s.kind), s.node, s.layer))
    return sites, notes


def install_probe(model: onnx.ModelProto, site: ProbeSite, probe: Probe) -> None:
    """Make ``site`` compute ``x @ probe.weight + probe.bias`` in ``model``, in place (module docstring).
    Raises ValueError if the probe's shape is not ``[H, E]`` / ``[E]`` of the site or a weight is not
    finite."""
    H, E = site.hidden, site.num_experts
    w = np.ascontiguousarray(probe.weight, np.float32)
    b = np.ascontiguousarray(probe.bias, np.float32).reshape(-1)
    what = f"probe {site.kind} node {site.node} -> layer {site.layer}"
    if w.shape != (H, E) or b.shape != (E,):
        raise ValueError(
            f"{what}: expected weight [{H}, {E}] and bias [{E}], found {list(w.shape)} and {list(b.shape)}"
        )
    if not (np.isfinite(w).all() and np.isfinite(b).all()):
        raise ValueError(f"{what}: expected finite weights, found NaN or inf")
    stem = probe_name(site.kind, site.node, site.layer)
    wname, bname = f"{stem}_weight", f"{stem}_bias"
    g = GraphIndex(model.graph)
    if wname in g.initializers and bname in g.initializers:  # installed before: new values, same nodes
        g.initializers[wname].CopyFrom(numpy_helper.from_array(w, wname))
        g.initializers[bname].CopyFrom(numpy_helper.from_array(b, bname))
        _drop_stale(model)
        return
    chain = _linear(g, site.logits)
    if isinstance(chain, str):
        raise ValueError(f"{what}: {site.logits!r} is {chain}")
    x, old = chain
    old_ids = {id(n) for n in old}
    readers = [n for n in g.consumers.get(site.logits, []) if id(n) not in old_ids]
    drop = {id(n) for n in old if all(len(g.consumers.get(o, [])) <= 1 for o in n.output)}
    mm, logits = g.fresh(f"{stem}_matmul_out"), g.fresh(f"{stem}_logits")
    nodes = [
        helper.make_node("MatMul", [x, wname], [mm], name=g.fresh(f"{stem}_matmul", nodes=True)),
        helper.make_node("Add", [mm, bname], [logits], name=g.fresh(f"{stem}_bias", nodes=True)),
    ]
    for r in readers:
        for k, i in enumerate(r.input):
            if i == site.logits:
                r.input[k] = logits
    position = {id(n): i for i, n in enumerate(model.graph.node)}
    insert_nodes(
        model,
        {min(position[id(r)] for r in readers): nodes},
        initializers=[numpy_helper.from_array(w, wname), numpy_helper.from_array(b, bname)],
        drop=drop,
    )
    _drop_stale(model)


def _drop_stale(model: onnx.ModelProto) -> None:
    """Remove probe weights no node reads (an earlier probe's under other names; a model's own stay)."""
    used = {i for n in model.graph.node for i in n.input}
    for t in [t for t in model.graph.initializer if t.name.startswith(PROBE_PREFIX) and t.name not in used]:
        model.graph.initializer.remove(t)


def install_probes(graph_path: str | Path, probes: Sequence[Probe]) -> list[str]:
    """Install ``probes`` into the graph file ``graph_path`` (rewritten through a temporary file and a rename;
    weights in external data files are only referenced). Returns one line per probe installed. Raises
    ValueError naming the site when a probe has no site in the graph or the wrong shape (nothing written)."""
    path = Path(graph_path)
    model = onnx.load(str(path), load_external_data=False)
    # found once: installing one site rewires only the readers of its own logits, not another site's tensors
    sites, notes = probe_sites(model, baseline=False)
    by_key = {s.key: s for s in sites}
    lines = []
    for probe in probes:
        site = by_key.get(probe.key)
        if site is None:
            kind, node, layer = probe.key
            why = "; ".join(notes) or f"sites {[s.key[1:] for s in sites if s.kind == kind]}"
            raise ValueError(
                f"{path}: probe {kind} node {node} -> layer {layer}: no such site in the graph ({why})"
            )
        install_probe(model, site, probe)
        shape = f"{site.hidden} x {site.num_experts}"
        lines.append(f"{site.kind} node {site.node} -> layer {site.layer}: fitted probe ({shape})")
    if probes:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            onnx.save(model, str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return lines
