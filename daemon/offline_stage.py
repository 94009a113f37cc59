"""The offline stage's products as the daemon's backend finds them in the model store."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def is_prepared(store: str | None) -> bool:
    """Whether ``mpnp prepare`` has left a day state in the model store."""
    from adapt.prepare import DAY_STATE, RECORD_FILE
    from mpnp.paths import model_store_dir

    return (model_store_dir(store) / "states" / DAY_STATE / RECORD_FILE).is_file()


def load_prepared(store: str | None, llm=None, tokenizer=None):
    """The offline stage's products: reused as they are when ``mpnp prepare`` left a day
    state (whatever configuration made it), else the offline stage runs now (default config)."""
    from adapt.prepare import DAY_STATE, RECORD_FILE, Prepared, ensure_prepared
    from encoders.base import load_encoder
    from mpnp.paths import model_store_dir

    root = model_store_dir(store)
    state_dir = root / "states" / DAY_STATE
    record_path = state_dir / RECORD_FILE
    if not record_path.is_file():
        log.warning("no offline stage in %s yet: running it now (`mpnp prepare`)", root)
        return ensure_prepared(store, llm=llm, tokenizer=tokenizer, progress=True)
    record = json.loads(record_path.read_text())
    encoders = {}
    for modality, fingerprint in record["encoders"].items():
        kind = {"camera": "camera-vit", "lidar": "lidar-rangevit"}.get(modality, modality)
        encoder = load_encoder(root / "encoders" / kind)
        if encoder.fingerprint() != fingerprint:
            raise ValueError(f"{root / 'encoders' / kind} changed since the day state was "
                             "trained; run `mpnp prepare` again")
        encoders[modality] = encoder
    return Prepared(root, Path(record["data_dir"]), encoders, state_dir, record)
