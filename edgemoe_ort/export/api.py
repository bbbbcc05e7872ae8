"""Stage 4: the whole pipeline, ``export_model`` — load, patch, trace + check, write the bundle."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from transformers import AutoConfig

from edgemoe_ort.bundle import BundleWriter
from edgemoe_ort.bundle.dense_quant import (
    DEFAULT_DENSE_BITS,
    DEFAULT_DENSE_BLOCK_SIZE,
    DenseQuantReport,
    check_dense_options,
    quantize_dense,
)
from edgemoe_ort.bundle.format import PRIMARY, TWIN, twin_choices
from edgemoe_ort.bundle.routing import RoutingReport, wire_routing
from edgemoe_ort.bundle.wiring import WiringReport, wire_prefetch_inputs
from edgemoe_ort.bundle.writer import check_target
from edgemoe_ort.export.dense_kinds import label_weight_kinds
from edgemoe_ort.export.load import checkpoint_config, load_model
from edgemoe_ort.export.patch import patch_model
from edgemoe_ort.export.recipes import Recipe, load_recipe
from edgemoe_ort.export.trace import ExportCheckError, GraphReport, export_graphs
from edgemoe_ort.hub import ModelSource, ModelSourceError, check_source, hub_offline
from edgemoe_ort.plan.format import (
    Plan,
    PlanError,
    PlanLayer,
    check_plan_layers,
    check_plan_model,
    resolve_plan,
)
from edgemoe_ort.quant import BITS
from edgemoe_ort.quant import BITS_TO_DTYPE as _QUANT_BITS_TO_DTYPE

log = logging.getLogger(__name__)

#: ``bits`` -> expert dtype of the bundle (edgemoe_ort.quant's table: 32 fp32, 16 fp16, 8 int8, 4 int4,
#: 3 int3, 2 int2)
BITS_TO_DTYPE = _QUANT_BITS_TO_DTYPE

#: default ``lookahead``: later layers whose router logits each OffloadedExpert node gets as input 3
DEFAULT_LOOKAHEAD = 3

#: ``progress(stage, done, total)``: stage is one of "load", "patch", "trace", "write", "experts", in that
#: order (the graphs are written before the experts are read, so their weights are gone by then)
Progress = Callable[[str, int, int], None]


@dataclass
class ExportReport:
    bundle: Path
    family: str
    layers: int
    experts: int
    #: the experts' dtype; a plan's mix: the dtypes joined by commas (as edgemoe-inspect shows a layer)
    dtype: str
    seconds: dict[str, float] = field(default_factory=dict)
    graphs: list[GraphReport] = field(default_factory=list)
    #: per graph role, what :func:`~edgemoe_ort.bundle.wiring.wire_prefetch_inputs` wired (empty: lookahead 0)
    wiring: dict[str, WiringReport] = field(default_factory=dict)
    #: per graph role, where CacheAwareTopK replaced the routers' selection (bundle/routing.py)
    routing: dict[str, RoutingReport] = field(default_factory=dict)
    #: the manifest's ``tokenizer_graphs`` (export/tokenizer_graphs.py); None: the checkpoint has no tokenizer
    tokenizer_graphs: dict[str, object] | None = None
    #: per graph role, the dense weights' bytes per kind before / after ``dense_bits`` (bundle/dense_quant.py)
    dense: dict[str, DenseQuantReport] = field(default_factory=dict)
    #: the low-bit twins' dtype, or None
    twin: str | None = None
    #: the plan the experts' dtypes came from (None: one dtype, ``bits``)
    plan: Path | None = None
    #: experts per dtype
    dtypes: dict[str, int] = field(default_factory=dict)


def export_model(
    model_id_or_path: str | Path | ModelSource,
    out_dir: str | Path,
    *,
    bits: int | None = None,
    group_size: int | None = None,
    force: bool = False,
    progress: Progress | None = None,
    lookahead: int = DEFAULT_LOOKAHEAD,
    dense_bits: int = DEFAULT_DENSE_BITS,
    dense_group_size: int = DEFAULT_DENSE_BLOCK_SIZE,
    stream: bool = True,
    twin: str | None = None,
    plan: str | Path | Plan | None = None,
) -> Path:
    """Export a HF MoE checkpoint (hub id or local folder) to a bundle folder and return its path.

    The bundle holds the dense graph(s) with one ``edgemoe.OffloadedExpert`` node per MoE layer, every routed
    expert quantized to ``bits`` (2, 3, 4, 8, 16 = fp16, 32 = fp32: :data:`BITS_TO_DTYPE`; default 4) with
    ``group_size`` (default 64), the tokenizer if the checkpoint has one, and the checkpoint's config. An
    existing ``out_dir`` is refused unless ``force`` (checked before anything is loaded); a failed export
    leaves ``out_dir`` untouched.

    ``model_id_or_path`` is checked first (:func:`~edgemoe_ort.hub.check_source`; a
    :class:`~edgemoe_ort.hub.ModelSource` it returned is not checked again). A hub id the hub does not answer
    for is loaded from the local cache, offline for the duration of the export only.

    ``lookahead`` > 0 wires HOBBIT's stacked gates: each node gets the router logits of up to ``lookahead``
    later MoE layers of its graph, computed on its own input, as input 3, and the first node of the decoder
    gets ``input_ids`` as input 4 (opset 2, docs/op-contract.md); 0 keeps the 3-input opset-1 nodes.

    Where the family's recipe names the routers' selection step (``[routing]``), it becomes an
    ``edgemoe.CacheAwareTopK`` node (opset 3): the session's ``edgemoe.routing`` rule then decides, and the
    default rule ``exact`` computes what the router computed, bit for bit.

    ``stream`` (default): the routed experts are never loaded as a whole: the graph is traced with them on the
    meta device, then each expert is read from the checkpoint's safetensors, checked against the graph,
    quantized and appended on its own (export/stream.py): peak memory is about the dense part in float32 plus
    a few copies of one expert. A checkpoint that cannot stream (no safetensors, quantized) is loaded whole,
    with the reason logged. ``stream=False`` loads the whole checkpoint in float32 (the same bundle).

    ``dense_bits`` (32, 16, 8, 4) stores the dense graph's embeddings, attention, shared experts, dense MLPs
    and LM head in that many bits, 8 and 4 block-wise in groups of ``dense_group_size`` through ORT's
    ``MatMulNBits`` / ``GatherBlockQuantized``; routers stay float32 (docs/bundle-format.md, "Dense weights").

    ``twin`` (a quantized dtype with fewer bits than ``bits``, e.g. ``"int2"``) adds HOBBIT's low-bit twin of
    every expert (bundle format version 2): with ``miss_precision="dynamic"`` the runtime reads it on a miss
    of an unimportant expert (docs/op-contract.md, "Miss precision"). The same group size. With a
    ``plan``, an expert whose planned format has no more bits than ``twin`` gets no twin.

    ``plan`` (a plan.json of ``edgemoe-plan``, or a :class:`~edgemoe_ort.plan.Plan`): each expert in its
    planned dtype, at the plan's group size. The plan decides: ``bits`` must be left out, and ``group_size``
    left out or equal to the plan's. A plan that does not parse, names unknown or misses experts, uses a dtype
    this build has no format for, or was made for another model (family, config fingerprint) is refused
    before anything is loaded; its MoE layers' shapes are compared once the model is patched and each
    expert's weights fingerprint as it is read, both before anything is written to ``out_dir``.

    Every option is checked before anything is loaded.
    """
    return export_model_with_report(
        model_id_or_path,
        out_dir,
        bits=bits,
        group_size=group_size,
        force=force,
        progress=progress,
        lookahead=lookahead,
        dense_bits=dense_bits,
        dense_group_size=dense_group_size,
        stream=stream,
        twin=twin,
        plan=plan,
    ).bundle


def export_model_with_report(
    model_id_or_path: str | Path | ModelSource,
    out_dir: str | Path,
    *,
    bits: int | None = None,
    group_size: int | None = None,
    force: bool = False,
    progress: Progress | None = None,
    lookahead: int = DEFAULT_LOOKAHEAD,
    dense_bits: int = DEFAULT_DENSE_BITS,
    dense_group_size: int = DEFAULT_DENSE_BLOCK_SIZE,
    stream: bool = True,
    twin: str | None = None,
    plan: str | Path | Plan | None = None,
) -> ExportReport:
    """:func:`export_model`, returning timings, graph statistics, the prefetch wiring and the dense
    quantization as well."""
    the_plan = resolve_plan(plan, bits=bits, group_size=group_size)
    if the_plan is not None:
        bits, group_size = None, the_plan.group_size
    bits = 4 if bits is None else bits
    group_size = 64 if group_size is None else group_size
    check_export_options(bits=bits, group_size=group_size, lookahead=lookahead, dense_bits=dense_bits,
                         dense_group_size=dense_group_size)
    # a twin has fewer bits than the experts' (with a plan: than its widest experts'; narrower ones get none)
    widest = bits if the_plan is None else max(BITS[d] for d in the_plan.dtypes.values())
    check_twin_option(twin, BITS_TO_DTYPE[widest])
    dtype = BITS_TO_DTYPE[bits]
    check_target(out_dir, force=force)  # before anything slow (BundleWriter checks again)
    source = check_source(model_id_or_path)
    with hub_offline(source.offline):
        return _export(source.name, Path(out_dir), dtype=dtype, group_size=group_size, force=force,
                       progress=progress, lookahead=lookahead, dense_bits=dense_bits,
                       dense_group_size=dense_group_size, stream=stream, twin=twin, expert_plan=the_plan)


def check_export_options(*, bits: int, group_size: int, lookahead: int, dense_bits: int,
                         dense_group_size: int, twin: str | None = None) -> None:
    """Raise ValueError naming the first bad option (expected vs found); cheap, so it runs before any load."""
    if isinstance(bits, bool) or bits not in BITS_TO_DTYPE:
        raise ValueError(f"bits must be one of {sorted(BITS_TO_DTYPE)}, found {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1, found {group_size!r}")
    if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
        raise ValueError(f"lookahead must be an integer >= 0, found {lookahead!r}")
    check_dense_options(dense_bits, dense_group_size)
    check_twin_option(twin, BITS_TO_DTYPE[bits])


def check_twin_option(twin: str | None, primary: str) -> None:
    """Raise ValueError unless ``twin`` is None or a quantized format with fewer bits than ``primary``."""
    if twin is not None:
        choices = twin_choices(primary)
        if twin not in choices:
            listed = ", ".join(choices) or "(none: no format has fewer bits)"
            raise ValueError(f"twin must be one of {listed} "
                             f"(a quantized format with fewer bits than the experts' {primary}), "
                             f"found {twin!r}")


def _export(
    model_id_or_path: str,
    out: Path,
    *,
    dtype: str,
    group_size: int,
    force: bool,
    progress: Progress | None,
    lookahead: int,
    dense_bits: int,
    dense_group_size: int,
    stream: bool = True,
    twin: str | None = None,
    expert_plan: Plan | None = None,
) -> ExportReport:
    def tick(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(stage, done, total)

    seconds: dict[str, float] = {}
    wiring: dict[str, WiringReport] = {}
    routing: dict[str, RoutingReport] = {}
    dense: dict[str, DenseQuantReport] = {}
    t0 = time.perf_counter()
    try:
        model_type = AutoConfig.from_pretrained(str(model_id_or_path)).model_type
    except (OSError, ValueError) as exc:  # not found on the hub, unreadable config.json, unknown model_type
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelSourceError(f"{model_id_or_path}: {first}") from exc
    load_recipe(model_type)  # unsupported families fail here, before anything heavy
    if expert_plan is not None:  # a plan for another model fails here too
        check_plan_model(expert_plan, model_type, checkpoint_config(model_id_or_path), str(model_id_or_path))
    # BundleWriter refuses an existing target (without force) right away and writes into a temporary sibling
    with BundleWriter(
        out, family=model_type, config=checkpoint_config(model_id_or_path), force=force
    ) as writer:
        tick("load", 0, 1)
        loaded = load_model(model_id_or_path, stream=stream)
        seconds["load"] = time.perf_counter() - t0
        tick("load", 1, 1)

        t = time.perf_counter()
        tick("patch", 0, 1)
        patched = patch_model(loaded.model, loaded.recipe)
        seconds["patch"] = time.perf_counter() - t
        tick("patch", 1, 1)
        try:
            t = time.perf_counter()
            tick("trace", 0, len(loaded.recipe.graphs))
            if expert_plan is not None:  # before tracing: the shapes the plan was made for
                check_plan_layers(expert_plan, [PlanLayer(m.spec.layer, m.spec.num_experts, m.spec.hidden,
                                                   m.spec.intermediate, m.spec.gated,
                                                   m.weights.b_in is not None) for m in patched.layers],
                                  str(model_id_or_path))
            # streamed: the weights are freed as the graph takes its copy (they are not needed afterwards)
            graphs = export_graphs(patched, free_weights=loaded.experts is not None)
            seconds["trace"] = time.perf_counter() - t
            tick("trace", len(graphs), len(graphs))

            from edgemoe_ort.export.stream import iter_experts
            from edgemoe_ort.export.trace import ExpertLeakGuard

            # streamed (loaded.experts): each expert is read after the graphs are written, checked against
            # them (fingerprints taken here, from the graphs as traced), then dropped
            guard = None
            if loaded.experts is not None:
                guard = ExpertLeakGuard([(plan.role, proto) for plan, proto, _ in graphs], patched.layers)
                patched.drop_weights()  # traced: the graphs have their own copy of the dense weights

            # the graphs first: once written, their weights leave memory before any expert is read
            t = time.perf_counter()
            tick("write", 0, 1)
            block_paths = [m.block_path for m in patched.layers]
            for plan, proto, _ in graphs:
                label_weight_kinds(proto, loaded.recipe, block_paths)  # before wiring adds unlabelled nodes
                if lookahead > 0:
                    wiring[plan.role] = wire_prefetch_inputs(
                        proto, lookahead=lookahead, token_ids="input_ids" if plan.role == "decoder" else None
                    )
                routing[plan.role] = _wire_routing(proto, loaded.recipe, plan.role)
                dense[plan.role] = dq = quantize_dense(proto, bits=dense_bits, block_size=dense_group_size)
                if dense_bits < 32 and not sum(dq.weights.values()):
                    log.warning("%s: --dense-bits %d converted no weight (%s)", plan.role, dense_bits,
                                "; ".join(dq.summary()[:1] + dq.skipped[:3]))
                writer.add_graph(plan.role, proto)
            from edgemoe_ort.export.tokenizer_graphs import write_tokenizer_graphs

            tok_graphs = None
            if loaded.tokenizer_dir is not None and (loaded.tokenizer_dir / "tokenizer.json").is_file():
                writer.add_tokenizer(loaded.tokenizer_dir)
                tok_graphs = write_tokenizer_graphs(writer, loaded.tokenizer_dir).info
            graph_reports = [r for _, _, r in graphs]
            del graphs, proto
            seconds["write"] = time.perf_counter() - t
            tick("write", 1, 1)

            t = time.perf_counter()
            total = sum(m.spec.num_experts for m in patched.layers)
            done = 0
            for m in patched.layers:
                s = m.spec
                writer.add_layer(
                    s.layer,
                    num_experts=s.num_experts,
                    top_k=s.top_k,
                    hidden=s.hidden,
                    intermediate=s.intermediate,
                    gated=s.gated,
                    activation=s.activation,
                )
                for e, w in iter_experts(m, loaded.experts):
                    w_in, w_out = _np(w.w_in), _np(w.w_out)
                    if guard is not None:
                        guard.check_expert(s.layer, e, w_in, w_out)
                    b_in = None if w.b_in is None else _np(w.b_in)
                    b_out = None if w.b_out is None else _np(w.b_out)
                    if expert_plan is not None:
                        _check_plan_weights(expert_plan, s.layer, e, w_in, w_out, b_in, b_out,
                                            str(model_id_or_path))
                    fmt = dtype if expert_plan is None else expert_plan.dtypes[(s.layer, e)]
                    copies = [(PRIMARY, fmt)]
                    if twin is not None and BITS[twin] < BITS[fmt]:  # its twin, from the same weights
                        copies.append((TWIN, twin))
                    for variant, f in copies:
                        writer.add_expert(s.layer, e, w_in, w_out, dtype=f, group_size=group_size,
                                          b_in=b_in, b_out=b_out, variant=variant)
                    del w, w_in, w_out, b_in, b_out  # before the next expert is read
                    done += 1
                    tick("experts", done, total)
                if guard is not None:
                    guard.check_layer(s.layer)
            seconds["experts"] = time.perf_counter() - t
            t = time.perf_counter()
        finally:
            patched.release()
    seconds["write"] += time.perf_counter() - t  # + the manifest, checks and the move into place
    seconds["total"] = time.perf_counter() - t0
    log.info("exported %s to %s in %.1fs", model_id_or_path, out, seconds["total"])
    for role, r in wiring.items():
        for line in r.summary():
            log.info("prefetch wiring (%s): %s", role, line)
    for role, rr in routing.items():
        for line in rr.summary():
            log.info("routing (%s): %s", role, line)
    for role, dq in dense.items():
        for line in dq.summary():
            log.info("dense weights (%s): %s", role, line)
    counts = Counter(expert_plan.dtypes.values()) if expert_plan is not None else Counter({dtype: total})
    return ExportReport(
        twin=twin,
        bundle=out.absolute(),
        family=model_type,
        layers=len(patched.layers),
        experts=total,
        dtype=",".join(sorted(counts)),
        plan=None if expert_plan is None or expert_plan.path is None else Path(expert_plan.path),
        dtypes=dict(sorted(counts.items())),
        seconds=seconds,
        graphs=graph_reports,
        wiring=wiring,
        routing=routing,
        tokenizer_graphs=tok_graphs,
        dense=dense,
    )


def _wire_routing(proto: onnx.ModelProto, recipe: Recipe, role: str) -> RoutingReport:
    """CacheAwareTopK in place of each router's selection, where the recipe names the seam; a graph that does
    not show the recipe's seam is an export error (the recipe is wrong for this checkpoint)."""
    if recipe.routing is None:
        report = RoutingReport()
        report.notes.append(f"cache-aware routing not wired: {recipe.routing_why}")
        return report
    report = wire_routing(proto, expect=recipe.routing)
    missing = [w for w in report.layers if not w.wired]
    if missing:
        raise ExportCheckError(
            f"{role}: recipe {recipe.path.name} says routing seam {recipe.routing.seam} over "
            f"{recipe.routing.scores}, but layer {missing[0].layer}: {missing[0].note}"
        )
    return report


def _check_plan_weights(plan: Plan, layer: int, expert: int, w_in: np.ndarray, w_out: np.ndarray,
                        b_in: np.ndarray | None, b_out: np.ndarray | None, where: str) -> None:
    from edgemoe_ort.plan.format import expert_digest

    found = expert_digest(w_in, w_out, b_in, b_out)
    if found != plan.digests[(layer, expert)]:
        raise PlanError(plan.path or "plan", "xxh3", layer=layer, expert=expert,
                        expected=f"{plan.digests[(layer, expert)]} (the weights the plan measured)",
                        found=f"{found} in {where}",
                        message="the plan was made for other weights of this model; plan again")


def _np(t: object) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)  # type: ignore[attr-defined]
