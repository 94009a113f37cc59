"""Validation data for DAMC's λ search (:mod:`aligners.compose`) through the evaluate path.

The composition core is pure; here a candidate composed state is scored the way every
other state is — installed into the resident model, wrapped as an mPnP connector, answered
greedily and scored by exact match (:func:`adapt.evaluate.evaluate`) — on the validation
split only. :func:`validation_features` reads nothing but the ``val`` split from disk.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence

from adapt.connectors.base import ConnectorConfig
from adapt.connectors.mpnp import MPnPConnector
from adapt.data import dataset_features
from adapt.evaluate import evaluate
from adapt.features import FeatureSet
from aligners.compose import ValScore
from aligners.model import MPnPModel
from aligners.state import StateData, install_state
from mpnp.measure import count_flops
from scenes.dataset import QADataset

log = logging.getLogger(__name__)

VAL_SPLIT = "val"
_ids = itertools.count()


def validation_features(prepared, context: str = "night", samples: int | None = None, *,
                        progress: bool = False, seed: int = 0) -> FeatureSet:
    """The ``context`` (``day``/``night``) questions of the prepared world's val split.

    Only the val split is read (train and test are never opened); ``samples`` takes a
    deterministic random subset to bound the search's cost.
    """
    if context not in ("day", "night"):
        raise ValueError(f"context must be 'day' or 'night', got {context!r}")
    data = QADataset.load(prepared.data_dir, VAL_SPLIT).filter(night=context == "night")
    if len(data) == 0:
        raise ValueError(f"{prepared.data_dir}: no {context} questions in the val split")
    val = dataset_features(data, prepared.encoders, prepared.feature_cache(), progress=progress)
    if samples and samples < len(val):
        val = val.fraction(samples / len(val), seed=seed)
    log.info("λ search on %d %s validation questions", len(val), context)
    return val


def validation_evaluator(model: MPnPModel, val: FeatureSet, *, batch_size: int = 16,
                         max_new_tokens: int = 6, stop_at_answers: Sequence[str] = (),
                         measure_flops: bool = True) -> Callable[[StateData], ValScore]:
    """A callback for :func:`aligners.compose.search_lambdas`: accuracy of a candidate on
    ``val`` (and the questions and inference FLOPs it took).

    Each candidate is installed as a temporary state and removed afterwards; the state that
    was active before is active again when the callback returns.
    """

    def score(candidate: StateData) -> ValScore:
        name = f"compose-candidate-{next(_ids)}"
        previous = model.active_name
        install_state(model, candidate, name=name, activate=True)
        try:
            state = model.states[name]
            specs = [s for s in state.modalities if s.name in state.connected]
            config = ConnectorConfig(num_blocks=state.config.num_blocks,
                                     max_new_tokens=max_new_tokens,
                                     stop_at_answers=tuple(stop_at_answers))
            connector = MPnPConnector(model.llm, model.tokenizer, specs, config, model=model,
                                      state_name=name)
            if measure_flops:
                with count_flops() as flops:
                    result = evaluate(connector, val, batch_size=batch_size)
                total = float(flops.total)
            else:
                result = evaluate(connector, val, batch_size=batch_size)
                total = None
        finally:
            model.remove_state(name)
            model.activate(previous if previous in model.states else None)
        return ValScore(result.accuracy, result.count, total)

    return score
