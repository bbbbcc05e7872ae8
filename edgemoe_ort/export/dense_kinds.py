"""Label the traced graph's weight-consuming nodes with the kind of weight they use (bundle/dense.py).

The kind comes from the module the dynamo exporter says a node was traced from (its ``name_scopes``
metadata; the innermost module) and the family's recipe (which children of a MoE block route and which are
shared experts). Rules, first match wins (docs/bundle-format.md, "Dense weights"):

1. inside a MoE block: the recipe's router child -> ``gate``; a shared-expert child whose name ends in
   ``gate`` (Qwen2-MoE's ``shared_expert_gate``) -> ``gate``; another shared-expert child ->
   ``shared_expert``; the rest of the block (its own shape constants) -> ``other``;
2. a module named ``lm_head`` -> ``lm_head``;
3. a ``Gather`` whose table (input 0) is a weight -> ``embedding`` (inside an attention module: ``other``);
4. a module whose name contains ``norm`` -> ``norm``;
5. a module path with a component containing ``attn`` / ``attention`` -> ``attention``;
6. a module path with a component ``mlp``, ``ffn``, ``feed_forward`` or ``DenseReluDense`` -> ``dense_mlp``;
7. else ``other``.
"""

from __future__ import annotations

import ast
from collections import Counter

import onnx

from edgemoe_ort.bundle.dense import set_node_kind
from edgemoe_ort.export.recipes import Recipe

__all__ = ["label_weight_kinds", "module_kind"]

_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
#: the export wrappers (export/wrappers.py) hold the HF model as ``self.model``
_WRAPPER_PREFIX = "model."
_MLP_NAMES = ("mlp", "ffn", "feed_forward", "densereludense")


def module_kind(path: str, lookup: bool, recipe: Recipe, block_paths: list[str]) -> str:
    """The kind of the weights a node traced from HF module ``path`` uses (rules above); ``lookup``: the node
    is a ``Gather`` from a weight table."""
    for block in block_paths:
        if path.startswith(block + "."):
            child = path[len(block) + 1 :].split(".")[0]
            if child == recipe.router:
                return "gate"
            if child in recipe.shared_expert:
                return "gate" if child.endswith("gate") else "shared_expert"
            return "other"
        if path == block:
            return "other"  # the block's own constants (shapes, indices)
    parts = path.split(".") if path else []
    if parts and parts[-1] == "lm_head":
        return "lm_head"
    in_attention = any("attn" in p.lower() or "attention" in p.lower() for p in parts)
    if lookup:
        return "other" if in_attention else "embedding"  # Switch's relative_attention_bias: a tiny table
    if parts and "norm" in parts[-1].lower():
        return "norm"
    if in_attention:
        return "attention"
    if any(p.lower() in _MLP_NAMES for p in parts):
        return "dense_mlp"
    return "other"


def _module_path(node: onnx.NodeProto) -> str | None:
    for p in node.metadata_props:
        if p.key == _SCOPES_KEY:
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return None
            if not isinstance(scopes, list) or len(scopes) < 2:
                return None
            inner = str(scopes[-2])  # the last entry is the op itself
            return inner[len(_WRAPPER_PREFIX) :] if inner.startswith(_WRAPPER_PREFIX) else inner
    return None


def label_weight_kinds(model: onnx.ModelProto, recipe: Recipe, block_paths: list[str]) -> Counter[str]:
    """Label every node of ``model`` that consumes an initializer and has a traced module path; returns how
    many nodes got each kind."""
    inits = {t.name for t in model.graph.initializer}
    counts: Counter[str] = Counter()
    for node in model.graph.node:
        if not any(i in inits for i in node.input):
            continue
        path = _module_path(node)
        if path is None:
            continue
        lookup = node.op_type == "Gather" and node.input[0] in inits
        kind = module_kind(path, lookup, recipe, block_paths)
        set_node_kind(node, kind)
        counts[kind] += 1
    return counts
