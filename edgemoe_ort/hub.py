"""Where the checkpoint to export comes from: a local folder, or a hub id (cached, or the hub must answer).

Light on purpose (no torch, no transformers): ``edgemoe-export`` checks its MODEL argument with
:func:`check_source` before the exporter's heavy imports, so a typo fails in a fraction of a second.
"""

from __future__ import annotations

import os
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HUB_TIMEOUT_S", "ModelSource", "ModelSourceError", "check_source", "hub_offline"]

#: a hub id: ``name`` or ``namespace/name``
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
#: seconds the exporter waits for the hub (name lookup included) before calling the machine offline
HUB_TIMEOUT_S = 3.0
#: HTTP statuses only the hub itself gives (a proxy's 502/503/504 is not the hub answering)
_HUB_ANSWERS = (401, 404)


#: the weight files from_pretrained loads from a checkpoint folder (one of them must be there)
WEIGHT_FILES = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
)


class ModelSourceError(ValueError):
    """The checkpoint to export cannot be found: a missing folder, a folder without ``config.json`` or
    without weights, or a hub id that is neither cached nor reachable."""


@dataclass(frozen=True)
class ModelSource:
    """A checkpoint :func:`check_source` accepted: ``name`` as given (a folder or a hub id); ``offline``: a
    hub id to load from the local HuggingFace cache without asking the hub (HF_HUB_OFFLINE is set, or the
    hub did not answer). The exporter takes it in place of the name and does not check it again."""

    name: str
    offline: bool = False

    def __str__(self) -> str:
        return self.name


def _probe(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as r:
            return 200 <= r.status < 400
    except urllib.error.HTTPError as exc:
        return 200 <= exc.code < 400 or exc.code in _HUB_ANSWERS
    except (OSError, ValueError):
        return False


def _hub_reachable(timeout: float | None = None) -> bool:
    """Whether the hub (``HF_ENDPOINT``) answers within ``timeout`` seconds (default :data:`HUB_TIMEOUT_S`),
    name lookup included: the probe runs in a daemon thread, so a stalled resolver (which urlopen's timeout
    does not bound) cannot hold the caller longer."""
    timeout = HUB_TIMEOUT_S if timeout is None else timeout
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    answer: list[bool] = []
    probe = threading.Thread(target=lambda: answer.append(_probe(f"{endpoint}/api/models", timeout)),
                             name="edgemoe-hub-probe", daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(answer) and answer[0]


@contextmanager
def hub_offline(offline: bool = True) -> Iterator[None]:
    """Within the block, huggingface_hub and transformers use the local cache only (``HF_HUB_OFFLINE``, the
    environment variable and the live value huggingface_hub read at import); both are restored after. Not
    thread-safe: it changes process-wide settings for the duration."""
    if not offline:
        yield
        return
    import huggingface_hub.constants as hub_constants

    env, live = os.environ.get("HF_HUB_OFFLINE"), hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = live
        if env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = env


def check_source(model_id_or_path: str | Path | ModelSource) -> ModelSource:
    """Fail fast, in one line, when ``model_id_or_path`` cannot be exported: a local folder must hold a
    ``config.json``; a hub id must be in the local HuggingFace cache or the hub must answer within
    :data:`HUB_TIMEOUT_S`. Returns the :class:`ModelSource` (offline: load the cached snapshot without 30 s
    of retries, see :func:`hub_offline`); a ``ModelSource`` is returned as it is, already checked. Changes
    no process settings."""
    if isinstance(model_id_or_path, ModelSource):
        return model_id_or_path
    source = str(model_id_or_path)
    local = Path(source).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelSourceError(f"{source}: expected a checkpoint folder or a hub id, found a file")
        if not (local / "config.json").is_file():
            raise ModelSourceError(f"{source}: no config.json in this folder (expected a HuggingFace "
                                   "checkpoint folder: config.json + weights)")
        if not any(any(local.glob(pattern)) for pattern in WEIGHT_FILES):
            raise ModelSourceError(f"{source}: no weights in this folder (expected one of "
                                   f"{', '.join(WEIGHT_FILES)} beside config.json)")
        return ModelSource(source)
    if source.startswith(("/", ".", "~")) or not _HUB_ID.fullmatch(source):
        raise ModelSourceError(f"{source}: no such folder (expected a local checkpoint folder or a hub id "
                               "like mistralai/Mixtral-8x7B-v0.1)")
    import huggingface_hub.constants as hub_constants
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(source, "config.json"), str)
    set_offline = bool(hub_constants.HF_HUB_OFFLINE)
    if not set_offline and _hub_reachable():
        return ModelSource(source)
    if cached:
        return ModelSource(source, offline=True)
    why = "HF_HUB_OFFLINE is set" if set_offline else "the HuggingFace hub is unreachable: offline?"
    raise ModelSourceError(
        f"{source}: no such folder, and not in the HuggingFace cache ({why}); download it where there "
        f"is network (hf download {source} --local-dir DIR) and pass the folder"
    )
