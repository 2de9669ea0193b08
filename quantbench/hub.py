"""Whether the Hugging Face hub can be used here, and offline mode for a block of code (a leaf module).

Loaders never wait on network retries: a fast TCP probe decides, and without a hub huggingface_hub and datasets
run in offline mode, where only cached files load.
"""
from __future__ import annotations

import contextlib
import os
import socket
from urllib.parse import urlparse


def offline_env() -> bool:
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` is set."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def reachable(timeout: float = 2.0) -> bool:
    """True when the HF endpoint accepts a TCP connection within ``timeout`` (never retries)."""
    if offline_env():
        return False
    from huggingface_hub import constants  # start-up time: huggingface_hub only when a hub is asked about

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def offline_mode():
    """Put huggingface_hub and datasets in offline mode for a block (cache only, no retries), then restore."""
    import datasets.config  # start-up time: datasets takes ~1 s to import
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved
