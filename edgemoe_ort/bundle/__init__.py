"""Bundle format v1 (docs/bundle-format.md): writer, reader/validator, test fixtures (``.testing``), the
prefetch wiring of exported graphs (``.wiring``)."""

from .errors import BundleError, BundleExistsError
from .format import ALIGNMENT, FORMAT, FORMAT_VERSION, MANIFEST, STORE_FILE, TENSOR_ALIGNMENT
from .reader import Bundle
from .writer import BundleWriter

__all__ = [
    "ALIGNMENT",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "STORE_FILE",
    "TENSOR_ALIGNMENT",
    "Bundle",
    "BundleError",
    "BundleExistsError",
    "BundleWriter",
]
