"""The offline stage's products as the daemon's backend finds them in the model store."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def is_prepared(store: str | None) -> bool:
    """Whether ``mpnp prepare`` has left a day state in the model store."""
    from adapt.prepare import DAY_STATE, RECORD_FILE
    from mpnp.paths import model_store_dir

    return (model_store_dir(store) / "states" / DAY_STATE / RECORD_FILE).is_file()


def load_prepared(store: str | None, llm=None, tokenizer=None):
    """The offline stage's products: reused as they are when ``mpnp prepare`` left a day
    state (whatever configuration made it; encoders of sensors added since are pretrained
    once), else the offline stage runs now (default config)."""
    from adapt.prepare import DAY_STATE, RECORD_FILE, ensure_prepared, open_prepared
    from mpnp.paths import model_store_dir

    root = model_store_dir(store)
    if not (root / "states" / DAY_STATE / RECORD_FILE).is_file():
        log.warning("no offline stage in %s yet: running it now (`mpnp prepare`)", root)
        return ensure_prepared(store, llm=llm, tokenizer=tokenizer, progress=True)
    return open_prepared(store)
