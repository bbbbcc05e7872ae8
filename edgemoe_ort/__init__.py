"""edgemoe-ort: run Mixture-of-Experts models with their experts offloaded to flash inside ONNX Runtime.

``edgemoe_ort.runtime`` runs bundles (``MoEModel``, ``load_model``), ``edgemoe_ort.export`` makes them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__: str = version("edgemoe-ort")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
