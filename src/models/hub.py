"""Hub weights without 30 s of retries: before timm (or transformers) asks the Hugging Face hub for weights, look in
the local HF cache; with no network (`HF_HUB_OFFLINE=1`, or the hub's host does not answer within 2 s) a missing
file fails at once in one line, and a cached one is loaded with the hub switched to offline mode (huggingface_hub
otherwise retries the network before it falls back to its cache)."""
from __future__ import annotations

import functools
import os
import socket
from typing import Iterable, Optional

from ..errors import UserError

HUB_HOST = "huggingface.co"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


@functools.lru_cache(maxsize=None)
def _reachable(host: str = HUB_HOST, timeout: float = 2.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def offline() -> bool:
    """No hub: HF_HUB_OFFLINE set (or huggingface_hub's own flag), or the host not reachable (probed once)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover
        return True
    return not _reachable()


def cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def cached_file(repo_id: str, filenames: Iterable[str] = WEIGHT_FILES) -> Optional[str]:
    """The path of the first of `filenames` of `repo_id` in the local HF cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    for f in filenames:
        try:
            p = try_to_load_from_cache(repo_id, f)
        except Exception:  # a malformed repo id: not cached
            return None
        if isinstance(p, str):
            return p
    return None


def go_offline() -> None:
    """Make huggingface_hub serve from its cache without trying the network first (it reads the flag per call)."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"


def check_timm_weights(arch: str, role: str = "model") -> None:
    """Before `timm.create_model(arch, pretrained=True)`: offline and the weights not cached -> one line at once;
    offline and cached -> the hub in offline mode. Online, or weights timm fetches by URL: nothing to do."""
    import timm

    try:
        repo = getattr(timm.models.get_pretrained_cfg(arch), "hf_hub_id", None)
    except Exception:  # no pretrained config: timm's own error names it
        return
    if not repo or not offline():
        return
    if cached_file(repo) is not None:
        go_offline()
        return
    raise UserError(f"timm model '{arch}' ({role}): its hub weights ({repo}) are not in the HF cache ({cache_dir()}) "
                    f"and the hub is unreachable (offline): give the weights as a local file "
                    f"('{arch}@/path/to/weights.safetensors'), or fill the cache where there is a network "
                    f"(`huggingface-cli download {repo}`)")
