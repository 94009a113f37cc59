"""The mPnP recipe: how states are connected and how their aligners start.

One definition shared by the offline stage (``adapt/prepare.py``), Table 1
(``bench/table1.py``) and, through the offline stage's saved states, the daemon, so that
what the benchmark measures is what the vehicle runs. ``mpnp bench grounding`` is where
recipes are compared (on validation questions); the chosen one becomes :data:`DEFAULT`.

A recipe covers the connection (gate, initial α, aligner space, per-block maps: see
:class:`aligners.config.ConnectionConfig`) and the optional text-anchored aligner
pretraining (``aligners/anchoring.py``). The latter is Algorithm 1's "pre-trained aligners
for every modality": :func:`pretrain_aligners` builds a state holding anchored aligners of
every sensor, which runtime Adapt starts new modalities from.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

from adapt.features import FeatureSet
from aligners.anchoring import AnchorConfig, AnchorReport, anchor_modality
from aligners.config import ConnectionConfig, ModalitySpec
from aligners.model import MPnPModel
from encoders.base import Encoder
from scenes.sample import Frame

log = logging.getLogger(__name__)

#: The resident state that holds the offline stage's pretrained aligners of every modality.
ALIGNER_STATE = "offline-aligners"


@dataclass
class Recipe:
    """Attributes:
        gate / init_alpha / aligner_space / block_maps: the connection
            (:class:`aligners.config.ConnectionConfig`).
        anchor: text-anchored aligner pretraining on the training frames before a state
            trains (``None``: aligners start from their random initialisation).
    """

    gate: str = "scale"
    init_alpha: float | None = None
    aligner_space: str = "kv"
    block_maps: bool = False
    anchor: AnchorConfig | None = field(default=None)

    def __post_init__(self) -> None:
        self.connection(1)  # validates the connection fields
        if isinstance(self.anchor, dict):
            self.anchor = AnchorConfig(**self.anchor)

    def connection(self, num_blocks: int, **changes) -> ConnectionConfig:
        """The connection of a state with ``num_blocks`` connected blocks."""
        return ConnectionConfig(num_blocks=num_blocks, gate=self.gate,
                                init_alpha=self.init_alpha, aligner_space=self.aligner_space,
                                block_maps=self.block_maps, **changes)

    def describe(self) -> str:
        parts = [f"gate {self.gate}"]
        if self.init_alpha is not None:
            parts.append(f"initial α {self.init_alpha}")
        parts.append("the paper's K/V aligners" if self.aligner_space == "kv"
                     else "hidden-space aligners")
        if self.block_maps:
            parts.append("per-block maps")
        if self.anchor is not None:
            parts.append(f"text-anchored ({self.anchor.frames} frames, {self.anchor.steps} "
                         "steps)")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> Recipe:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown Recipe fields: {sorted(unknown)}")
        return cls(**data)


#: The paper's recipe (official initialisation, ``scale`` gate, K/V aligners from scratch).
PAPER = Recipe()
#: Hidden-space aligners with per-block maps, text-anchored, the injection starting nearly
#: closed (logit gate, α₀ 0.05): the best reader of ``mpnp bench grounding`` (README).
ANCHORED = Recipe(gate="logit", init_alpha=0.05, aligner_space="hidden", block_maps=True,
                  anchor=AnchorConfig())
#: Recipes by the name ``--recipe`` takes.
RECIPES: dict[str, Recipe] = {"paper": PAPER, "anchored": ANCHORED}
#: The project's default.
DEFAULT = PAPER


def recipe_named(name: str) -> Recipe:
    """A copy of the recipe called ``name`` (:data:`RECIPES`)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {sorted(RECIPES)}")
    return replace(RECIPES[name])


def anchor_state(model: MPnPModel, modality: str, encoder: Encoder, data: FeatureSet,
                 frame_of: Callable[[str], Frame], recipe: Recipe, *,
                 progress: bool = False, autocast: str = "off") -> AnchorReport | None:
    """Anchor the active state's ``modality`` aligners on the frames ``data``'s questions ask
    about (no others: a training set's frames), as ``recipe`` says (nothing when it has no
    anchoring). ``frame_of`` gives a frame's ground truth; ``autocast`` is the precision of
    the LLM reads and of the fit (:attr:`adapt.trainer.TrainConfig.autocast`: a call
    argument, like the training steps', outside any config digest)."""
    if recipe.anchor is None:
        return None
    frame_ids = sorted({item.frame_id for item in data.items})
    tokens = torch.stack([data.tokens[modality][f] for f in frame_ids])
    return anchor_modality(model, modality, encoder, [frame_of(f) for f in frame_ids], tokens,
                           recipe.anchor, progress=progress, autocast=autocast)


def pretrain_aligners(model: MPnPModel, specs: Mapping[str, ModalitySpec],
                      encoders: Mapping[str, Encoder], data: FeatureSet,
                      frame_of: Callable[[str], Frame], recipe: Recipe, num_blocks: int,
                      modalities: Sequence[str], *, name: str = ALIGNER_STATE,
                      progress: bool = False, autocast: str = "off") -> dict[str, dict]:
    """Algorithm 1's offline aligners for every modality: a resident state ``name`` whose
    ``modalities`` aligners are text-anchored on ``data``'s frames (``recipe.anchor``; the
    other connection fields as the recipe says) in the last ``num_blocks`` blocks. Runtime
    Adapt starts new modalities from it (``aligners_from``). The state is left inactive
    (the previously active one is restored); returns each modality's anchoring report."""
    if recipe.anchor is None:
        raise ValueError("pretrain_aligners needs a recipe with anchoring")
    was = model.active_name
    if name in model.states:
        model.remove_state(name)
    config = recipe.connection(num_blocks, lora=False)
    model.create_state(name, [specs[m] for m in modalities], config)
    reports = {}
    try:
        for m in modalities:
            reports[m] = anchor_state(model, m, encoders[m], data, frame_of, recipe,
                                      progress=progress, autocast=autocast).to_dict()
    finally:
        model.activate(was)
    return reports


def with_anchor(recipe: Recipe, **changes) -> Recipe:
    """``recipe`` with its anchoring changed (e.g. fewer steps for a quick run)."""
    if recipe.anchor is None:
        return recipe
    return replace(recipe, anchor=replace(recipe.anchor, **changes))
