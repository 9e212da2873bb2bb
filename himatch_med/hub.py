"""Where a Hub id's weights can come from: is the Hugging Face Hub reachable, are they in this machine's cache.

Standard library only (huggingface_hub's cache lookup, 0.15 s, is imported when asked), so that
:mod:`himatch_med.preflight` can answer before the heavy imports, and :mod:`himatch_med.backbone` says the same.
"""

from __future__ import annotations

import functools
import os

GATED_HELP = """
DINOv3 weights are gated: on a machine with network, accept the licence on the model's page while signed in, log in
(`hf auth login` or HF_TOKEN) and run once; the weights are then cached, or can be saved and copied as a folder."""


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``, read by huggingface_hub too) says not to ask the Hub."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.lower() in ("1", "true", "yes", "on")


def unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached (None when it can, or may through a proxy, or when offline).

    The endpoint is ``HF_ENDPOINT``'s (a mirror's) at its scheme's port. Through a proxy the Hub may answer where a
    direct connection cannot, so a proxy for the endpoint counts as reachable: huggingface_hub then finds out.
    """
    from urllib.parse import urlparse
    from urllib.request import getproxies, proxy_bypass

    if offline():
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    proxies = getproxies()
    if (endpoint.scheme in proxies or "all" in proxies) and not proxy_bypass(endpoint.hostname or ""):
        return None
    return probe(endpoint.hostname or "", endpoint.port or (80 if endpoint.scheme == "http" else 443), timeout)


@functools.cache
def probe(host: str, port: int, timeout: float) -> str | None:
    """Why ``host:port`` takes no connection within ``timeout`` seconds, name lookup included (None when it does).

    Asked once per process: the early checks and the backbone's loading then wait for the same answer at most once.
    """
    import socket
    import threading

    answer: list[str | None] = [f"no answer in {timeout:g} s"]

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answer[0] = None
        except OSError as error:
            answer[0] = error.strerror or str(error)

    # In a thread: the timeout of create_connection does not bound the name lookup, which a resolver that drops
    # packets can stretch to half a minute.
    asking = threading.Thread(target=connect, name="hub-probe", daemon=True)
    asking.start()
    asking.join(timeout)
    return None if answer[0] is None else f"{host}: {answer[0]}"


def cache_folder() -> str:
    """The Hugging Face cache folder this process looks in (``HF_HUB_CACHE``, ``HF_HOME``/hub or the default)."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def cached(model: str) -> bool:
    """Whether this machine's Hugging Face cache holds the Hub id's ``config.json`` (as transformers looks it up)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except ValueError:  # not a valid repository id ("a b", "x/y/z"): nothing of it can be cached
        return False


def offline_help(model: str, reason: str) -> str:
    """What to do about a Hub id that is neither in this machine's cache nor downloadable (``reason``: why not)."""
    return (f"--model {model}: not in this machine's Hugging Face cache ({cache_folder()}), and the Hub cannot be "
            f"reached ({reason}); "
            "check the spelling of the id, or, on a machine without network, pass --model /path/to/folder (weights "
            "saved with `save_pretrained`, e.g. copied from a machine with network)"
            + (GATED_HELP if "dinov3" in model.lower() else ""))
