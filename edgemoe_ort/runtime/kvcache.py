"""The decoder's KV cache, held once (docs/memory.md, ``kv_cache_bytes``).

A decoder step reads ``past_key_values.L.*`` and writes ``present.L.*`` (the past + the new tokens). Through
``session.run`` ORT allocates every present in its arena while the caller still holds every past, so the
cache exists twice during a step, and the arena (which keeps what it grew) fragments as the tensors grow by
a token each step: on the 24-layer bench model RSS grew by 2.7x the cache per decoded token.

:class:`KVRunner` binds the presents (IO binding) to buffers of a :class:`KVRing` instead: one region per
layer plus one spare, each sized for the context, in address space reserved up front and touched only as
the sequence grows. Layer 0's present goes to the spare region, layer 1's to the region that held layer 0's
past, and so on. By the time layer ``j`` writes its present, the graph has finished reading layer ``j - 1``'s
past: layer ``j``'s new keys are computed from layer ``j - 1``'s attention, which reads its present, the
concatenation of that past. So the cache is held once, plus one layer. :func:`kv_layout` checks that
order on the graph. A graph that fails the check gets as many spare regions as layers: the past and the
present are both held, as before, but outside the arena and without its fragmentation.

A step returns a :class:`KVState`, a read-only mapping of the presents by ``past_key_values.*`` name. Passing
it as the next step's past consumes it: its buffers are reused in place. Each state can therefore be
passed on once; a consumed state raises on any use, and :meth:`KVState.copy` keeps one.

Device-side: imports neither torch nor transformers nor onnx.
"""

from __future__ import annotations

import mmap
import sys
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["KVRing", "KVRunner", "KVState", "cache_bytes", "kv_layout", "layer_groups"]

_PAGE = mmap.PAGESIZE
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)
#: tokens a ring is sized for when the model's config names no context (it grows by a new ring beyond)
DEFAULT_CAPACITY = 2048
PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."


def present_name(past: str) -> str:
    return PRESENT_PREFIX + past[len(PAST_PREFIX):]


def layer_groups(past_specs: Sequence[tuple[str, int, int]]) -> list[list[tuple[str, int, int]]]:
    """The ``(name, kv_heads, head_dim)`` specs of the past inputs grouped by layer (``past_key_values.L.*``),
    in layer order (numeric ``L`` first, then as given)."""
    groups: dict[str, list[tuple[str, int, int]]] = {}
    for spec in past_specs:
        groups.setdefault(spec[0].rsplit(".", 1)[0], []).append(spec)

    def key(prefix: str) -> tuple[int, int | str]:
        layer = prefix[len(PAST_PREFIX):]
        return (0, int(layer)) if layer.isdigit() else (1, layer)

    return [groups[k] for k in sorted(groups, key=key)]


# --- the check on the graph ---------------------------------------------------------------------------
def _message(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """``(field number, wire type, value)`` of one protobuf message: ints for varints, bytes for
    length-delimited fields (fixed-size fields are skipped)."""
    i, end = 0, len(buf)

    def varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            b = buf[i]
            i += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    while i < end:
        key = varint()
        num, wt = key >> 3, key & 7
        if wt == 0:
            yield num, wt, varint()
        elif wt == 1:
            i += 8
        elif wt == 5:
            i += 4
        elif wt == 2:
            n = varint()
            yield num, wt, buf[i:i + n]
            i += n
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")


def _node(buf: bytes) -> tuple[str, list[str], list[str], int | None]:
    """(op_type, inputs, outputs, the ``axis`` attribute or None) of a NodeProto (input = 1, output = 2,
    op_type = 4, attribute = 5: AttributeProto name = 1, i = 3)."""
    op, ins, outs, axis = "", [], [], None
    for num, wt, v in _message(buf):
        if wt != 2:
            continue
        if num == 1:
            ins.append(v.decode("utf-8", "replace"))
        elif num == 2:
            outs.append(v.decode("utf-8", "replace"))
        elif num == 4:
            op = v.decode("utf-8", "replace")
        elif num == 5:
            fields = {n: x for n, _, x in _message(v)}
            if fields.get(1) == b"axis" and isinstance(fields.get(3), int):
                axis = fields[3] - (1 << 64) if fields[3] >= 1 << 63 else fields[3]
    return op, ins, outs, axis


def _graph_nodes(path: Path) -> Iterator[tuple[str, list[str], list[str], int | None]]:
    """:func:`_node` of the main graph's nodes, in file order (ModelProto.graph = 7, GraphProto.node = 1),
    one at a time, without reading the weights."""
    from .memory import _graph_fields

    with open(path, "rb") as f:
        for gnum, gwt, gstart, gn in _graph_fields(f):
            if gnum == 1 and gwt == 2:
                here = f.tell()
                f.seek(gstart)
                node = _node(f.read(gn))
                f.seek(here)
                yield node


def kv_layout(graph: Path, groups: Sequence[Sequence[tuple[str, int, int]]]) -> str | None:
    """How :class:`KVRunner` may run the graph. ``"concat"``: every past input is read by one ``Concat`` on
    the length axis making its ``present`` (and by ``Shape`` nodes, which read no data), so a present is
    ``[batch, kv_heads, past + new, head_dim]`` and may be bound to a buffer of that shape. ``"ordered"``:
    that, and the other inputs of layer ``j``'s Concats depend on both of layer ``j - 1``'s presents, so a
    step may write layer ``j``'s presents over layer ``j - 1``'s past. None: neither (control flow, unsorted
    nodes, another cache layout, an unreadable file): the steps run through ``session.run``. Read from the
    graph file, streaming its nodes."""
    layer_of = {name: j for j, g in enumerate(groups) for name, _, _ in g}
    present_bit = {present_name(name): 1 << k for k, name in enumerate(layer_of)}
    layer_bits = [sum(present_bit[present_name(name)] for name, _, _ in g) for g in groups]
    # mask[v]: the presents value v depends on (only nonzero masks are kept). Nodes out of topological order
    # can only make a mask smaller, so they can fail the order check, never pass it wrongly.
    mask: dict[str, int] = {}
    concat_inputs: dict[str, list[str]] = {}
    try:
        for op, ins, outs, axis in _graph_nodes(graph):
            if op in ("If", "Loop", "Scan"):  # subgraphs read outer values without naming them as inputs
                return None
            for i in ins:
                if i not in layer_of or op == "Shape":
                    continue
                if (op != "Concat" or axis not in (2, -2) or outs != [present_name(i)] or ins[0] != i
                        or i in concat_inputs):
                    return None
                concat_inputs[i] = ins[1:]
            m = 0
            for i in ins:
                m |= mask.get(i, 0)
            for o in outs:
                if m | present_bit.get(o, 0):
                    mask[o] = m | present_bit.get(o, 0)
    except (OSError, EOFError, ValueError, IndexError):
        return None
    if set(concat_inputs) != set(layer_of):
        return None
    for name, j in layer_of.items():
        m = 0
        for i in concat_inputs[name]:
            m |= mask.get(i, 0)
        if j and m & layer_bits[j - 1] != layer_bits[j - 1]:
            return "concat"
    return "ordered"


def cache_bytes(groups: Sequence[Sequence[tuple[str, int, int]]], layout: str | None, tokens: int,
                batch: int = 1) -> int:
    """What the KV cache costs at ``tokens`` tokens during a step (docs/memory.md, ``kv_cache_bytes``):
    ``layout`` "ordered" (:func:`kv_layout`): a :class:`KVRing` of one region per layer plus one, each as
    large as the largest layer's cache, whole pages; "concat": a region per layer twice; None (the steps
    run through ``session.run``): the cache twice, the past and ORT's presents."""
    if not groups:
        return 0
    if layout is None:
        return 2 * sum(h * d * 4 for g in groups for _, h, d in g) * batch * tokens
    per_token = max(h * d for g in groups for _, h, d in g) * 4 * batch
    regions = len(groups) + (1 if layout == "ordered" else len(groups))
    return regions * max(len(g) for g in groups) * (-(-per_token * tokens // _PAGE) * _PAGE)


# --- the buffers ---------------------------------------------------------------------------------------
def _reserve(nbytes: int) -> Any:
    """``nbytes`` of zeroed memory that costs RSS only where written: an anonymous private mapping (no swap
    reservation where the platform allows; no transparent huge pages, which would make every region's first
    write cost 2 MiB), else a numpy zeros buffer (large callocs are mapped lazily)."""
    try:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        mm = mmap.mmap(-1, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (AttributeError, TypeError, OSError, ValueError, OverflowError):
        return np.zeros(nbytes, np.uint8)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_NOHUGEPAGE)
        except OSError:
            pass
    return mm


class KVRing:
    """Regions of KV buffers for one sequence (one chain of :class:`KVState`): ``layers + spare`` regions,
    each of ``slots`` tensors of ``capacity`` tokens. A region holds one layer's tensors (``[batch,
    kv_heads, length, head_dim]``, contiguous, at the start of its slot). ``io``: the sequence's IO binding,
    rebound every step."""

    def __init__(self, groups: Sequence[Sequence[tuple[str, int, int]]], batch: int, capacity: int,
                 spare: int, io: Any) -> None:
        per_token = max(h * d for g in groups for _, h, d in g) * 4 * batch
        self.slots = max(len(g) for g in groups)
        self.batch = batch
        regions = len(groups) + spare
        while True:
            self.slot_bytes = -(-per_token * capacity // _PAGE) * _PAGE
            nbytes = regions * self.slots * self.slot_bytes
            try:
                buf = _reserve(nbytes)
                break
            except MemoryError:
                if capacity <= 64:
                    raise
                capacity //= 2  # a smaller reservation; a longer sequence continues in a new ring
        self.capacity = capacity
        self._buf = np.frombuffer(buf, np.uint8) if not isinstance(buf, np.ndarray) else buf
        self.base = self._buf.ctypes.data
        self.free: deque[int] = deque(range(regions))
        self.io = io

    def offset(self, region: int, slot: int) -> int:
        return (region * self.slots + slot) * self.slot_bytes

    def view(self, region: int, slot: int, heads: int, length: int, dim: int) -> np.ndarray:
        off = self.offset(region, slot)
        n = self.batch * heads * length * dim
        return self._buf[off:off + 4 * n].view(np.float32).reshape(self.batch, heads, length, dim)


class KVState(Mapping[str, np.ndarray]):
    """The KV cache after a step: ``past_key_values.* -> [batch, kv_heads, length, head_dim]`` (read-only
    views of the ring's buffers). Passing it as the past of the next step consumes it (the buffers are
    reused in place): after that every use raises :class:`~edgemoe_ort.runtime.generate.GenerationError`.
    :meth:`copy` keeps its arrays."""

    def __init__(self, runner: KVRunner, ring: KVRing, where: list[int], length: int) -> None:
        self._runner, self._ring, self._where = runner, ring, where
        self._arrays: dict[str, np.ndarray] | None = None  # made when first read (a decode loop never does)
        #: tokens the cache holds
        self.length = length
        self._valid = True

    @property
    def valid(self) -> bool:
        """False once the state has been passed on (its buffers then hold a later step's cache)."""
        return self._valid

    def _check(self) -> dict[str, np.ndarray]:
        if not self._valid:
            from .generate import GenerationError

            raise GenerationError(
                "past: this KV cache state was already passed to forward(), which reuses its buffers in "
                "place; pass each state on once (the one forward() returned last), or keep state.copy()"
            )
        if self._arrays is None:
            self._arrays = {}
            for j, g in enumerate(self._runner.groups):
                for slot, (name, heads, dim) in enumerate(g):
                    a = self._ring.view(self._where[j], slot, heads, self.length, dim)
                    a.flags.writeable = False
                    self._arrays[name] = a
        return self._arrays

    def __getitem__(self, name: str) -> np.ndarray:
        return self._check()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._check())

    def __len__(self) -> int:
        return len(self._runner._past_names)

    def copy(self) -> dict[str, np.ndarray]:
        """The cache as a dict of new arrays (a past that stays valid, and may be passed on any number of
        times; each use copies nothing further)."""
        return {k: v.copy() for k, v in self._check().items()}

    def __repr__(self) -> str:
        return f"KVState(length={self.length}, layers={len(self._where)}, valid={self._valid})"


class KVRunner:
    """Runs decoder steps with the presents written into a :class:`KVRing` (IO binding): ``run(feeds, past)``
    returns the graph's outputs other than the presents, by name, and the new :class:`KVState`. ``feeds``:
    the inputs other than the past (any past in it is ignored); ``past``: a :class:`KVState` of this runner
    (consumed), any mapping of arrays, or None (empty).

    ``ordered`` (:func:`kv_layout`): one spare region, the cache held once; else one spare per layer.
    ``capacity``: the tokens a ring is sized for (the model's context); a longer sequence moves to a new
    ring of twice the size."""

    def __init__(self, session: Any, past_specs: Sequence[tuple[str, int, int]], output_names: Sequence[str],
                 *, ordered: bool, capacity: int | None) -> None:
        self.session = session
        self.groups = layer_groups(past_specs)
        self.ordered = ordered
        self.capacity = int(capacity) if capacity else DEFAULT_CAPACITY
        #: (layer, slot, past name, present name, kv_heads, head_dim) of every cache tensor
        self._tensors = [(j, slot, name, present_name(name), h, d)
                         for j, g in enumerate(self.groups) for slot, (name, h, d) in enumerate(g)]
        self._past_names = {t[2] for t in self._tensors}
        presents = {t[3] for t in self._tensors}
        self._others = [o for o in output_names if o not in presents]
        self._static: dict[str, list[int | None]] = {}
        for o in session.get_outputs():
            if o.name in self._others and o.type == "tensor(float)":
                self._static[o.name] = [d if isinstance(d, int) else None for d in o.shape]

    def _new_ring(self, batch: int, length: int, capacity: int) -> KVRing:
        while capacity < length:
            capacity *= 2
        spare = 1 if self.ordered else len(self.groups)
        return KVRing(self.groups, batch, capacity, spare, self.session.io_binding())

    def run(self, feeds: Mapping[str, np.ndarray], past: Mapping[str, np.ndarray] | None
            ) -> tuple[dict[str, np.ndarray], KVState]:
        batch, seq = feeds["input_ids"].shape
        own = isinstance(past, KVState) and past._runner is self
        if own:
            past._check()  # type: ignore[union-attr]
            past_len = past.length  # type: ignore[union-attr]
        else:
            past_len = next(iter(past.values())).shape[2] if past else 0
        length = past_len + seq
        ring = past._ring if own else None  # type: ignore[union-attr]
        if ring is None or length > ring.capacity or ring.batch != batch:
            grown = ring is not None and length > ring.capacity
            ring = self._new_ring(batch, length, 2 * ring.capacity if grown else self.capacity)  # type: ignore
            if own:  # the past stays where it is (its ring is not written), read as any other array
                past, own = dict(past), False  # type: ignore[arg-type]
        io = ring.io
        for name, value in feeds.items():
            if name not in self._past_names:
                io.bind_cpu_input(name, np.ascontiguousarray(value))
        where: list[int] = []
        released: list[int] = []
        old_where = past._where if own else None  # type: ignore[union-attr]
        for j, slot, name, present, heads, dim in self._tensors:
            if slot == 0:
                where.append(ring.free.popleft())
                if old_where is not None:
                    (ring.free.append if self.ordered else released.append)(old_where[j])
            if old_where is not None:
                io.bind_input(name, "cpu", 0, np.float32, [batch, heads, past_len, dim],
                              ring.base + ring.offset(old_where[j], slot))
            elif past:
                io.bind_cpu_input(name, np.ascontiguousarray(past[name], dtype=np.float32))
            else:
                io.bind_cpu_input(name, np.zeros((batch, heads, 0, dim), np.float32))
            io.bind_output(present, "cpu", 0, np.float32, [batch, heads, length, dim],
                           ring.base + ring.offset(where[j], slot))
        ring.free.extend(released)
        out: dict[str, np.ndarray] = {}
        dynamic = []
        for name in self._others:
            dims = self._static.get(name)
            if name == "logits" and dims is not None and len(dims) == 3 and dims[2] is not None:
                out[name] = np.empty((batch, seq, dims[2]), np.float32)
                io.bind_output(name, "cpu", 0, np.float32, list(out[name].shape), out[name].ctypes.data)
            else:
                io.bind_output(name, "cpu")
                dynamic.append(name)
        if own:
            past._valid = False  # type: ignore[union-attr]  # from here on its buffers are being rewritten
        self.session.run_with_iobinding(io)
        if dynamic:  # bound in order: the presents, then the other outputs
            values = io.get_outputs()
            for name in dynamic:
                out[name] = values[len(self._tensors) + self._others.index(name)].numpy()
        return out, KVState(self, ring, where, length)
