"""The fitted residual probe in a decoder graph: the ``scores`` of a ``ResidualPrefetch`` node computed by a
linear map fitted to the layer's own router instead of by the router itself (docs/bundle-format.md,
"profile.json", ``residual_probe``; docs/op-contract.md, "ResidualPrefetch").

The ``ResidualPrefetch`` node of layer ``t`` (:mod:`.residual`) gets ``scores = Softmax(router_t(x))``,
``x`` = ``t``'s normalization applied to the residual stream *before* ``t``'s attention. The router was
trained on the stream *after* it, so its guess misses what the attention adds. A probe ``(W [H, E], b [E])``
fitted by least squares from ``x`` to ``router_t`` on the real stream (``edgemoe-profile`` fits it:
:mod:`edgemoe_ort.profile.probe`) predicts that: the scores become ``Softmax(x @ W + b)``.

- :func:`probe_sites`: per ``ResidualPrefetch`` node, the tensors a fit needs (``x``, the layer's router
  logits) and the router itself (the probe's baseline);
- :func:`install_probe`: the scores path of one node rewritten to ``Softmax(MatMul(x, W) + b)`` with the
  initializers ``edgemoe_probe_l{t}_weight`` / ``_bias``; a second install replaces their values (nothing
  else changes);
- :func:`install_probes`: the same on a bundle's decoder graph file (tmp + rename; external weights are only
  referenced).

Only the prefetcher reads the scores: the model's outputs do not change. Torch-free (onnx + numpy).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import DOMAIN, GraphIndex, insert_nodes, node_attrs
from .wiring import Router, _find_router

__all__ = ["PROBE_PREFIX", "Probe", "ProbeSite", "probe_sites", "install_probe", "install_probes"]

#: prefix of the initializers and nodes a probe adds
PROBE_PREFIX = "edgemoe_probe"
_RESIDUAL = "ResidualPrefetch"
_OFFLOADED = "OffloadedExpert"
_ONNX = ("", "ai.onnx")


@dataclass(frozen=True)
class Probe:
    """A fitted probe of one layer: ``scores = softmax(x @ weight + bias)``."""

    layer: int
    weight: np.ndarray  #: float32 ``[H, E]``
    bias: np.ndarray  #: float32 ``[E]``

    def logits(self, x: np.ndarray) -> np.ndarray:
        """``x @ weight + bias`` for ``x`` ``[N, H]`` (float64)."""
        return np.asarray(x, np.float64) @ self.weight.astype(np.float64) + self.bias.astype(np.float64)


@dataclass(frozen=True)
class ProbeSite:
    """Where a probe of layer ``layer`` goes, and what its fit reads (graph tensor names)."""

    layer: int
    features: str  #: ``x`` ``[T, H]``: the normalized residual stream the scores are computed from
    target: str  #: the layer's own router logits (``[..., E]``): what the probe is fitted to
    softmax: str  #: the name of the ``Softmax`` node computing the scores
    hidden: int
    num_experts: int
    #: the router itself as a probe (the baseline a fit is compared with); None when not asked for
    router: Probe | None = None


def _const(g: GraphIndex, name: str | None) -> np.ndarray | None:
    t = g.constant(name) if name else None
    return None if t is None else numpy_helper.to_array(t)


def _router_probe(g: GraphIndex, layer: int, router: Router) -> Probe | str:
    """The router as ``x @ W + b``, or why its weights are not
    readable here (external data not loaded)."""
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
    return Probe(layer, w.astype(np.float32), b.astype(np.float32))


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


def _scores_chain(
    g: GraphIndex, node: onnx.NodeProto
) -> tuple[onnx.NodeProto, str, list[onnx.NodeProto]] | str:
    """``(softmax, x, nodes between x and the softmax)`` of a ResidualPrefetch node's scores, or why not."""
    sm = g.producer.get(node.input[1]) if len(node.input) > 1 else None
    if sm is None or sm.op_type != "Softmax" or sm.domain not in _ONNX:
        return "its scores are not a Softmax"
    chain: list[onnx.NodeProto] = []
    cur = g.producer.get(sm.input[0])
    while cur is not None and len(chain) < 3:
        chain.append(cur)
        if cur.op_type in ("MatMul", "Gemm") and cur.domain in _ONNX:
            return sm, cur.input[0], chain
        if cur.op_type != "Add" or cur.domain not in _ONNX:
            break
        data = [i for i in cur.input if g.constant(i) is None]
        if len(data) != 1:
            break
        cur = g.producer.get(data[0])
    return "its scores are not Softmax(MatMul / Gemm (+ Add) of one tensor)"


def probe_sites(model: onnx.ModelProto, baseline: bool = True) -> tuple[list[ProbeSite], list[str]]:
    """The :class:`ProbeSite` of every ``ResidualPrefetch`` node of ``model`` (by layer) and a note for each
    node that cannot take a probe. ``baseline``: read each router's weights into :attr:`ProbeSite.router`
    (``model`` must have its external data loaded)."""
    g = GraphIndex(model.graph)
    offloaded = {
        int(node_attrs(n).get("layer", -1)): n
        for n in model.graph.node
        if n.op_type == _OFFLOADED and n.domain == DOMAIN
    }
    sites: list[ProbeSite] = []
    notes: list[str] = []
    for n in model.graph.node:
        if n.op_type != _RESIDUAL or n.domain != DOMAIN:
            continue
        t = int(node_attrs(n).get("layer", -1))
        chain = _scores_chain(g, n)
        if isinstance(chain, str):
            notes.append(f"layer {t}: no probe: {chain}")
            continue
        sm, x, _ = chain
        router, why = _find_router(g, offloaded[t]) if t in offloaded else (None, "no OffloadedExpert node")
        if router is None:
            notes.append(f"layer {t}: no probe: router not found ({why})")
            continue
        target = _router_output(g, router)
        base = _router_probe(g, t, router) if baseline else None
        if target is None or isinstance(base, str):
            notes.append(
                f"layer {t}: no probe: {base if isinstance(base, str) else 'router output not found'}"
            )
            continue
        sites.append(ProbeSite(t, x, target, sm.name, router.hidden, router.num_experts, base))
    sites.sort(key=lambda s: s.layer)
    return sites, notes


def _names(layer: int) -> tuple[str, str]:
    return f"{PROBE_PREFIX}_l{layer}_weight", f"{PROBE_PREFIX}_l{layer}_bias"


def install_probe(model: onnx.ModelProto, site: ProbeSite, probe: Probe) -> None:
    """Make ``site``'s scores ``Softmax(x @ probe.weight + probe.bias)`` in ``model``, in place (see the
    module docstring). Raises ValueError if the probe's shape is not ``[H, E]`` / ``[E]`` of the site."""
    H, E = site.hidden, site.num_experts
    w = np.ascontiguousarray(probe.weight, np.float32)
    b = np.ascontiguousarray(probe.bias, np.float32).reshape(-1)
    if w.shape != (H, E) or b.shape != (E,):
        raise ValueError(
            f"residual_probe layer {site.layer}: expected weight [{H}, {E}] and bias [{E}], found "
            f"{list(w.shape)} and {list(b.shape)}"
        )
    if not (np.isfinite(w).all() and np.isfinite(b).all()):
        raise ValueError(f"residual_probe layer {site.layer}: expected finite weights, found NaN or inf")
    wname, bname = _names(site.layer)
    g = GraphIndex(model.graph)
    if wname in g.initializers and bname in g.initializers:  # installed before: new values, same nodes
        g.initializers[wname].CopyFrom(numpy_helper.from_array(w, wname))
        g.initializers[bname].CopyFrom(numpy_helper.from_array(b, bname))
        return
    sm = next(n for n in model.graph.node if n.name == site.softmax)
    chain = _scores_chain(g, next(c for c in g.consumers[sm.output[0]] if c.op_type == _RESIDUAL))
    assert not isinstance(chain, str)
    _, x, old = chain
    drop = {id(n) for n in old if all(len(g.consumers.get(o, [])) <= 1 for o in n.output)}
    tag = f"{PROBE_PREFIX}_l{site.layer}"
    mm, logits = g.fresh(f"{tag}_matmul_out"), g.fresh(f"{tag}_logits")
    nodes = [
        helper.make_node("MatMul", [x, wname], [mm], name=g.fresh(f"{tag}_matmul", nodes=True)),
        helper.make_node("Add", [mm, bname], [logits], name=g.fresh(f"{tag}_bias", nodes=True)),
    ]
    position = {id(n): i for i, n in enumerate(model.graph.node)}
    sm.input[0] = logits
    insert_nodes(
        model,
        {position[id(sm)]: nodes},
        initializers=[numpy_helper.from_array(w, wname), numpy_helper.from_array(b, bname)],
        drop=drop,
    )


def install_probes(graph_path: str | Path, probes: Mapping[int, Probe]) -> list[str]:
    """Install ``probes`` (by layer) into the graph file ``graph_path`` (rewritten through a temporary file
    and a rename; weights in external data files are only referenced). Returns one line per probe installed.
    Raises ValueError naming the layer when a probe has no site in the graph or the wrong shape."""
    path = Path(graph_path)
    model = onnx.load(str(path), load_external_data=False)
    sites, notes = probe_sites(model, baseline=False)
    by_layer = {s.layer: s for s in sites}
    lines = []
    for layer, probe in sorted(probes.items()):
        site = by_layer.get(layer)
        if site is None:
            why = "; ".join(notes) or f"{_RESIDUAL} nodes at layers {sorted(by_layer)}"
            raise ValueError(
                f"{path}: residual_probe layer {layer}: expected a {_RESIDUAL} node of that layer ({why})"
            )
        install_probe(model, site, probe)
        lines.append(
            f"layer {layer}: {_RESIDUAL} scores from the fitted probe ({site.hidden} x {site.num_experts})"
        )
    if probes:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            onnx.save(model, str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return lines
