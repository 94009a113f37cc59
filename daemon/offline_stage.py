"""The offline stage's products as the daemon's backend finds them in the model store.

Two offline stages exist, built by the one implementation (:func:`adapt.prepare.ensure_prepared`,
reopened by :func:`adapt.prepare.open_prepared`):

- ``full``: ``mpnp prepare``'s default configuration, in the model store itself (30-45 min
  on 2 cores, once);
- ``quick``: :meth:`adapt.prepare.PrepareConfig.quick` (a small world, 1-epoch encoders, a
  short day state: minutes), in the sub-store ``<model store>/demo-quick/`` (:data:`QUICK_SUBSTORE`)
  so that its products are never mistaken for the full stage's. The LLM always comes from
  the main store (it is never converted or copied again).

``mpnp demo --quick`` picks with :func:`choose_offline_stage`: the full stage where it is
already prepared, else the quick one (built once, reused afterwards).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: The offline stages a backend can build when its store has none (``offline_stage``).
OFFLINE_STAGES: tuple[str, ...] = ("full", "quick")
#: Where the quick offline stage lives, under the model store.
QUICK_SUBSTORE = "demo-quick"


def is_prepared(store: str | Path | None) -> bool:
    """Whether ``mpnp prepare`` (or the quick stage, for a sub-store) has left a day state in
    the model store ``store``."""
    from adapt.prepare import DAY_STATE, RECORD_FILE
    from mpnp.paths import model_store_dir

    return (model_store_dir(store) / "states" / DAY_STATE / RECORD_FILE).is_file()


def quick_store_dir(store: str | Path | None) -> Path:
    """The quick offline stage's sub-store of the model store ``store``."""
    from mpnp.paths import model_store_dir

    return model_store_dir(store) / QUICK_SUBSTORE


@dataclass(frozen=True)
class OfflineChoice:
    """Which offline stage a run uses: ``stage`` (``full`` / ``quick``), the store holding its
    products, and whether they are already there (else they are built first)."""

    stage: str
    store: Path
    prepared: bool

    def to_dict(self) -> dict:
        return {"stage": self.stage, "store": str(self.store), "was_prepared": self.prepared}


def choose_offline_stage(store: str | Path | None, quick: bool) -> OfflineChoice:
    """The offline stage for a run on the model store ``store``.

    Not ``quick``: the full stage in the store itself (built now if missing, as ever).
    ``quick``: the full stage if it is already prepared there, else the quick stage in
    :func:`quick_store_dir` (reused if it was built before).
    """
    from mpnp.paths import model_store_dir

    main = model_store_dir(store)
    full = is_prepared(main)
    if not quick or full:
        return OfflineChoice("full", main, full)
    sub = quick_store_dir(main)
    return OfflineChoice("quick", sub, is_prepared(sub))


def offline_config(stage: str):
    """The :class:`adapt.prepare.PrepareConfig` the offline stage ``stage`` builds."""
    from adapt.prepare import PrepareConfig

    if stage not in OFFLINE_STAGES:
        raise ValueError(f"offline stage must be one of {list(OFFLINE_STAGES)}, got {stage!r}")
    return PrepareConfig.quick() if stage == "quick" else PrepareConfig()


def load_prepared(store: str | Path | None, llm=None, tokenizer=None, stage: str = "full"):
    """The offline stage's products in the model store ``store``.

    ``full``: reused as they are when ``mpnp prepare`` left a day state (whatever
    configuration made it; encoders of sensors added since are pretrained once), else the
    offline stage runs now (default config). ``quick``: :meth:`PrepareConfig.quick`
    through :func:`adapt.prepare.ensure_prepared`, which reuses what matches it and
    (re)builds the rest — ``store`` is then the quick sub-store, never the main one.
    """
    from adapt.prepare import ensure_prepared, open_prepared
    from mpnp.paths import model_store_dir

    config = offline_config(stage)
    root = model_store_dir(store)
    prepared = is_prepared(root)
    if stage == "full" and prepared:
        return open_prepared(root)
    if not prepared:
        log.warning("no %s offline stage in %s yet: building it now (%s)", stage, root,
                    config.describe())
    return ensure_prepared(root, config, llm=llm, tokenizer=tokenizer, progress=True)
