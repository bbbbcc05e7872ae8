"""Host-side exporter: HF MoE checkpoint -> edgemoe bundle (torch / transformers live only here).

The pipeline, one module per stage:

1. :mod:`.load`     — ``from_pretrained`` (hub id or local folder) in float32 + the family recipe
   (``<repo>/export/<model_type>.toml``, :mod:`.recipes`); by default without the routed experts, which
   :mod:`.stream` reads one at a time from the checkpoint's safetensors after tracing;
2. :mod:`.patch`    — routed experts call the torch custom op ``edgemoe::offloaded_expert`` (:mod:`.op`);
   weights extracted to the canonical bundle layout;
3. :mod:`.wrappers` + :mod:`.trace` — flat-KV-cache wrappers traced by the dynamo exporter, the op translated
   to one ``edgemoe.OffloadedExpert`` node per MoE layer (:mod:`.schema`), graphs checked;
4. :mod:`.api`      — ``export_model`` wires the prefetch inputs (:mod:`edgemoe_ort.bundle.wiring`) and writes
   the bundle with :class:`edgemoe_ort.bundle.BundleWriter`.
"""

from edgemoe_ort.export.api import (
    BITS_TO_DTYPE,
    DEFAULT_LOOKAHEAD,
    ExportReport,
    export_model,
    export_model_with_report,
)
from edgemoe_ort.export.load import LoadedModel, load_model
from edgemoe_ort.export.patch import PatchedModel, patch_model
from edgemoe_ort.export.recipes import UnsupportedModelError, load_recipe, supported_model_types
from edgemoe_ort.export.trace import ExportCheckError
from edgemoe_ort.hub import ModelSourceError, check_source

__all__ = [
    "BITS_TO_DTYPE",
    "DEFAULT_LOOKAHEAD",
    "ExportCheckError",
    "ExportReport",
    "LoadedModel",
    "ModelSourceError",
    "PatchedModel",
    "UnsupportedModelError",
    "check_source",
    "export_model",
    "export_model_with_report",
    "load_model",
    "load_recipe",
    "patch_model",
    "supported_model_types",
]
