"""Where a Hub id's weights can come from: is the Hugging Face Hub reachable, are they in this machine's cache.

Standard library only (huggingface_hub's cache lookup, 0.15 s, is imported when asked), so that
:mod:`himatch_med.preflight` can answer before the heavy imports, and :mod:`himatch_med.backbone` says the same.
"""

from __future__ import annotations

import os

GATED_HELP = """
DINOv3 weights are gated: on a machine with network, accept the licence on the model's page while signed in, log in
(`hf auth login` or HF_TOKEN) and run once; the weights are then cached, or can be saved and copied as a folder."""


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` tells huggingface_hub not to ask the Hub."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached (None when it can, or when ``HF_HUB_OFFLINE`` already says so)."""
    import socket
    from urllib.parse import urlparse

    if offline():
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except OSError as error:
        return f"{endpoint.hostname}: {error.strerror or error}"
    return None


def cached(model: str) -> bool:
    """Whether this machine's Hugging Face cache holds the Hub id's ``config.json`` (as transformers looks it up)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except ValueError:  # not a valid repository id ("a b", "x/y/z"): nothing of it can be cached
        return False


def offline_help(model: str, reason: str) -> str:
    """What to do about a Hub id that is neither in this machine's cache nor downloadable (``reason``: why not)."""
    return (f"--model {model}: not in this machine's Hugging Face cache, and the Hub cannot be reached ({reason}); "
            "check the spelling of the id, or, on a machine without network, pass --model /path/to/folder (weights "
            "saved with `save_pretrained`, e.g. copied from a machine with network)"
            + (GATED_HELP if "dinov3" in model.lower() else ""))
