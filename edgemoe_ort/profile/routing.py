"""Routing taps: run a decoder bundle with every ``OffloadedExpert`` node's routing exposed as graph outputs.

:func:`write_tapped_graph` copies the bundle's decoder graph with inputs 1 (``topk_indices``), 2
(``topk_weights``) and, where wired, 3 (``next_router_logits``, docs/op-contract.md) of every
``OffloadedExpert`` node, and input 1 (``scores``) of every ``ResidualPrefetch`` node, added as outputs; with
``probes``, also what fitting the probes reads (:func:`edgemoe_ort.bundle.probe.probe_sites`).
:class:`RoutingRecorder` opens it with the bundle's expert store and either steps it like
``MoEModel.forward`` (:meth:`RoutingRecorder.forward`, with a KV cache: what the routing traces of
``edgemoe_ort.bench.trace`` use) or runs a token stream in fixed windows, each a fresh context, batched
(:meth:`RoutingRecorder.record`: what ``edgemoe-profile`` uses).

Imports neither torch nor transformers.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgemoe_ort.bundle import Bundle
from edgemoe_ort.bundle.probe import ProbeSite, probe_sites

__all__ = [
    "Tap",
    "LayerRouting",
    "Routing",
    "StepOutput",
    "routing_taps",
    "write_tapped_graph",
    "RoutingRecorder",
    "DEFAULT_WINDOW",
    "DEFAULT_BATCH",
]

DEFAULT_WINDOW = 128
DEFAULT_BATCH = 8


@dataclass(frozen=True)
class Tap:
    """The routing tensors of one ``OffloadedExpert`` node (graph tensor names)."""

    layer: int  #: the node's ``layer`` attribute (manifest layer index)
    indices: str  #: input 1, int64 ``[..., K]``
    weights: str  #: input 2, float ``[..., K]``
    next_logits: str | None  #: input 3, float ``[T, P, E]``, or None where the node has none
    #: input 1 of the ``ResidualPrefetch`` node of this layer, float ``[T, E]``, or None where there is none
    residual: str | None = None


@dataclass
class LayerRouting:
    """What one MoE layer chose for ``N`` tokens (in stream order)."""

    layer: int
    indices: np.ndarray  #: int64 ``[N, K]``
    weights: np.ndarray  #: float32 ``[N, K]``
    next_logits: np.ndarray | None  #: float32 ``[N, P, E]`` (row j = manifest layer ``layer + 1 + j``)
    #: float32 ``[N, E]``: this layer's router softmax on the residual stream entering it (ResidualPrefetch)
    residual: np.ndarray | None = None


@dataclass
class Routing:
    """The routing of a token stream: ``token_ids`` ``[N]``, one :class:`LayerRouting` per manifest layer."""

    token_ids: np.ndarray
    layers: list[LayerRouting]

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


@dataclass
class StepOutput:
    """One :meth:`RoutingRecorder.forward`: logits ``[B, S, V]``, the new KV cache and the routing."""

    logits: np.ndarray
    present: dict[str, np.ndarray]
    routing: dict[int, LayerRouting]


def _attr(node: onnx.NodeProto, name: str) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return None


def routing_taps(model: onnx.ModelProto, where: str = "graph") -> list[Tap]:
    """The :class:`Tap` of every ``OffloadedExpert`` node of ``model``, by layer."""
    taps = []
    residual = {
        int(_attr(n, "layer")): n.input[1]
        for n in model.graph.node
        if n.op_type == "ResidualPrefetch" and n.domain == "edgemoe" and _attr(n, "layer") is not None
    }
    for node in model.graph.node:
        if node.op_type != "OffloadedExpert" or node.domain != "edgemoe":
            continue
        layer = _attr(node, "layer")
        if layer is None:
            raise ValueError(f"{where}: OffloadedExpert node {node.name!r} has no 'layer' attribute")
        nxt = node.input[3] if len(node.input) > 3 and node.input[3] else None
        taps.append(Tap(int(layer), node.input[1], node.input[2], nxt, residual.get(int(layer))))
    if not taps:
        raise ValueError(f"{where}: no OffloadedExpert node")
    taps.sort(key=lambda t: t.layer)
    layers = [t.layer for t in taps]
    if len(set(layers)) != len(layers):
        raise ValueError(f"{where}: more than one OffloadedExpert node per layer ({layers})")
    return taps


def write_tapped_graph(
    bundle: Bundle, out_dir: str | Path, role: str = "decoder", *, probes: bool = False
) -> tuple[Path, list[Tap], list[ProbeSite]]:
    """Write ``out_dir/model.onnx`` (+ ``model.onnx.data``): the bundle's ``role`` graph with every tap of
    :func:`routing_taps` added as a graph output. Returns the path, the taps and, with ``probes``, the
    :class:`~edgemoe_ort.bundle.probe.ProbeSite` of every prediction site, whose ``features`` and
    ``target`` tensors are outputs too (else none)."""
    src = bundle.graph_path(role)
    model = onnx.load(str(src), load_external_data=True)
    taps = routing_taps(model, str(src))
    sites = probe_sites(model)[0] if probes else []
    existing = {o.name for o in model.graph.output}
    wanted = [
        (name, et)
        for t in taps
        for name, et in (
            (t.indices, TensorProto.INT64),
            (t.weights, TensorProto.FLOAT),
            (t.next_logits, TensorProto.FLOAT),
            (t.residual, TensorProto.FLOAT),
        )
    ]
    wanted += [(name, TensorProto.FLOAT) for s in sites for name in (s.features, s.target)]
    for name, et in wanted:
        if name is not None and name not in existing:
            model.graph.output.append(helper.make_tensor_value_info(name, et, None))
            existing.add(name)
    path = Path(out_dir) / "model.onnx"
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )
    return path, taps, sites


class RoutingRecorder:
    """A decoder bundle opened with its routing exposed (see the module docstring).

    >>> with RoutingRecorder("bundles/tiny") as rec:
    ...     routing = rec.record(token_ids)          # fixed windows of 128 tokens, 8 per batch
    ...     routing.layers[0].indices.shape          # (N, top_k)

    ``options``: the expert store's :class:`~edgemoe_ort.runtime.ops.RuntimeOptions` (default: the whole
    store may stay resident). ``probes``: also expose what fitting the probes reads
    (:attr:`probe_sites`; :meth:`record`'s ``on_outputs`` gets those tensors).
    """

    def __init__(self, bundle: Bundle | str | Path, options: Any = None, *, probes: bool = False) -> None:
        import onnxruntime as ort

        from edgemoe_ort.runtime.generate import _past_specs, _require
        from edgemoe_ort.runtime.ops import ExpertSession, RuntimeOptions, make_session_options

        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        from edgemoe_ort.bundle.format import model_graph_roles

        graphs = model_graph_roles(self.bundle.manifest.get("graphs", {}))  # the tokenizer graphs aside
        if graphs != ["decoder"]:
            raise ValueError(
                f"{self.bundle.path / 'manifest.json'}: graphs {sorted(graphs)}: routing is recorded on "
                "decoder-only bundles (graphs: decoder)"
            )
        self._tmp = tempfile.TemporaryDirectory(prefix="edgemoe-taps-")
        try:
            graph, self.taps, sites = write_tapped_graph(self.bundle, self._tmp.name, probes=probes)
            #: the probe sites of this graph (empty without ``probes``)
            self.probe_sites: list[ProbeSite] = sites
            options = options if options is not None else RuntimeOptions(predictor="none")
            so, sid = make_session_options(self.bundle.path, options)
            sess = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
            self.session = ExpertSession(sess, sid, self.bundle.path, options)
            _require(self.session, self.bundle.graph_path("decoder"), ["input_ids"], ["logits"])
        except BaseException:
            self._tmp.cleanup()
            raise
        self._inputs = [i.name for i in sess.get_inputs()]
        self._outputs = [o.name for o in sess.get_outputs()]
        self._past = _past_specs(sess, self.bundle.graph_path("decoder"))
        manifest_layers = len(self.bundle.layers)
        missing = sorted(set(range(manifest_layers)) - {t.layer for t in self.taps})
        if missing or any(t.layer >= manifest_layers for t in self.taps):
            raise ValueError(
                f"{self.bundle.graph_path('decoder')}: OffloadedExpert layers "
                f"{[t.layer for t in self.taps]}, expected one per manifest layer 0..{manifest_layers - 1}"
            )

    # -- lifetime --------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the session and remove the tapped graph."""
        self.session = None  # type: ignore[assignment]
        self._tmp.cleanup()

    def __enter__(self) -> RoutingRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def has_residual(self) -> bool:
        """Whether any layer has a ``ResidualPrefetch`` node (its router on the residual stream)."""
        return any(t.residual is not None for t in self.taps)

    @property
    def has_next_logits(self) -> bool:
        """Whether any node has input 3 (stacked next-router logits)."""
        return any(t.next_logits is not None for t in self.taps)

    # -- running ---------------------------------------------------------------------------------------
    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """An empty KV cache for ``batch`` sequences."""
        return {name: np.zeros((batch, heads, 0, dim), np.float32) for name, heads, dim in self._past}

    def forward(
        self,
        input_ids: np.ndarray,
        past: dict[str, np.ndarray] | None = None,
        on_outputs: Callable[[dict[str, np.ndarray]], None] | None = None,
    ) -> StepOutput:
        """One pass of ``input_ids`` ``[B, S]`` after ``past`` (None: a fresh context), with the feeds of
        ``MoEModel.forward`` (``attention_mask`` of ones, ``position_ids`` from the past length).
        ``on_outputs``: called with every graph output by name (the tensors of :attr:`probe_sites` too)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], found shape {input_ids.shape}")
        from edgemoe_ort.runtime.generate import decoder_feeds

        past = past if past is not None else self.empty_past(input_ids.shape[0])
        feeds = decoder_feeds(input_ids, past, self._inputs)
        res = dict(zip(self._outputs, self.session.run(None, feeds), strict=True))
        if on_outputs is not None:
            on_outputs(res)
        routing = {}
        for t in self.taps:
            k = res[t.indices].shape[-1]
            nxt = None
            if t.next_logits is not None:
                a = res[t.next_logits]
                nxt = a.reshape(-1, *a.shape[-2:]).astype(np.float32, copy=False)
            resid = None
            if t.residual is not None:
                a = res[t.residual]
                resid = a.reshape(-1, a.shape[-1]).astype(np.float32, copy=False)
            routing[t.layer] = LayerRouting(
                t.layer,
                res[t.indices].reshape(-1, k).astype(np.int64, copy=False),
                res[t.weights].reshape(-1, k).astype(np.float32, copy=False),
                nxt,
                resid,
            )
        present = {n: res[n.replace("past_key_values.", "present.")] for n, _, _ in self._past}
        return StepOutput(res["logits"], present, routing)

    def record(
        self,
        token_ids: np.ndarray | list[int],
        *,
        window: int = DEFAULT_WINDOW,
        batch: int = DEFAULT_BATCH,
        progress: Callable[[int, int], None] | None = None,
        on_outputs: Callable[[dict[str, np.ndarray]], None] | None = None,
    ) -> Routing:
        """The routing of every token of ``token_ids``, run in consecutive windows of ``window`` tokens (each
        a fresh context; the last may be shorter), ``batch`` windows per pass. ``progress(done, total)`` is
        called after each pass with token counts; ``on_outputs`` as in :meth:`forward`, per pass."""
        ids = np.asarray(token_ids, dtype=np.int64).ravel()
        if window < 1 or batch < 1:
            raise ValueError(f"window and batch must be >= 1, found window {window}, batch {batch}")
        n = int(ids.shape[0])
        parts: dict[int, list[LayerRouting]] = {t.layer: [] for t in self.taps}
        full = n // window
        chunks: list[np.ndarray] = [
            ids[s * window : min(s + batch, full) * window].reshape(-1, window) for s in range(0, full, batch)
        ]
        if n % window:
            chunks.append(ids[full * window :][None, :])
        done = 0
        for chunk in chunks:
            step = self.forward(chunk, on_outputs=on_outputs)
            for layer, r in step.routing.items():
                parts[layer].append(r)
            done += chunk.size
            if progress is not None:
                progress(done, n)
        layers = []
        for t in self.taps:
            rs = parts[t.layer]
            k = int(self.bundle.layers[t.layer]["top_k"])
            if rs:
                idx = np.concatenate([r.indices for r in rs])
                w = np.concatenate([r.weights for r in rs])
                nxt = np.concatenate([r.next_logits for r in rs]) if t.next_logits is not None else None
                resid = np.concatenate([r.residual for r in rs]) if t.residual is not None else None
            else:
                idx, w, nxt, resid = np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), None, None
            layers.append(LayerRouting(t.layer, idx, w, nxt, resid))
        return Routing(ids.copy(), layers)
