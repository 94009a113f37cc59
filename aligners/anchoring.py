"""Text-anchored aligner pretraining: make a modality's tokens speak the LLM's keys/values.

The offline stage of Algorithm 1 (mPnP-LLM, arXiv 2312.07886) ships *pretrained* aligners for
every modality, so runtime Adapt starts from tokens the LLM can already read. Here the
target of that pretraining is the LLM itself: for each token we know, from the frame's
ground truth, what it should say in words (:meth:`encoders.base.Encoder.describe_tokens`:
"parked car front left" for an oracle object token, a camera view's nearest objects for a
camera token). The LLM reads those words in a scene description ("objects: a, b, c.") and
we keep, in every connected block, the mean pre-RoPE key and value over each description's
words (:func:`text_anchors`). The aligners are then regressed so that each token's keys and
values in each block match its description's (:func:`anchor_aligners`, a normalised MSE per
block). No question, answer or LLM backward pass is involved: it costs one LLM forward per
frame and a few hundred small steps.

It is measured in ``mpnp bench grounding`` (README: Grounding). With hidden-space aligners
and per-block maps (``ConnectionConfig.aligner_space = "hidden"``, ``block_maps``) a token
can match every block's own K/V; with the paper's K/V aligners one key/value per token has
to serve all connected blocks, so the fit is an average.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from adapt.precision import autocast_context
from aligners.model import MPnPModel

log = logging.getLogger(__name__)

#: How a frame's token descriptions are joined into the text the LLM reads (as
#: :func:`encoders.oracle.describe_scene` writes a scene).
SCENE_PREFIX, SEPARATOR, SCENE_END = "objects: ", ", ", "."


@dataclass
class AnchorConfig:
    """Attributes:
        frames: training frames whose descriptions the LLM reads (targets) and whose tokens
            the aligners are fitted on.
        steps: Adam steps of the regression.
        batch_size: frames per step.
        lr: learning rate (aligners and per-block maps).
        text_batch: descriptions read per LLM forward.
        seed: frame sampling.
    """

    frames: int = 300
    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    text_batch: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("frames", "steps", "batch_size", "text_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"AnchorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"AnchorConfig.lr must be > 0, got {self.lr}")


@dataclass
class AnchorTargets:
    """Per distinct description, its mean pre-RoPE keys and values in each of ``layers``.

    Attributes:
        index: description -> row of ``keys`` / ``values``.
        keys, values: ``(U, len(layers), kv_width)``, the mean over the description's words
            and over every frame it appeared in.
        layers: the LLM blocks the targets are for (the state's connected blocks).
        frames: frames read.
        seconds: time spent reading them.
    """

    index: dict[str, int]
    keys: torch.Tensor
    values: torch.Tensor
    layers: list[int]
    frames: int
    seconds: float

    def ids(self, descriptions: Sequence[Sequence[str | None]]) -> torch.Tensor:
        """``(F, T)`` rows of each token's description (-1: none, or never read)."""
        return torch.tensor([[self.index.get(d, -1) if d is not None else -1 for d in frame]
                             for frame in descriptions], dtype=torch.long)


@dataclass
class AnchorReport:
    """What :func:`anchor_aligners` did: the final fit (normalised MSE of keys and values,
    mean over blocks; 0 = exact, 1 = no better than zero vectors) and its cost."""

    modality: str
    steps: int
    tokens: int
    key_nmse: float
    value_nmse: float
    seconds: float
    targets: int
    target_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _scene_text(descriptions: Sequence[str | None]) -> tuple[str, list[tuple[str, int, int]]]:
    """The text the LLM reads for one frame and each distinct description's character span."""
    text, spans, seen = SCENE_PREFIX, [], set()
    for d in descriptions:
        if d is None or d in seen:
            continue
        if seen:
            text += SEPARATOR
        seen.add(d)
        spans.append((d, len(text), len(text) + len(d)))
        text += d
    return text + SCENE_END, spans


def _token_spans(tokenizer, text: str, spans: list[tuple[str, int, int]]
                 ) -> tuple[list[int], list[tuple[str, list[int]]]]:
    """Token ids of ``text`` (with the model's BOS, if any) and the token positions of each
    span, from the decoded pieces (any tokenizer, no offset mapping needed)."""
    from mpnp.generation import bos_prefix

    words = tokenizer.encode(text, add_special_tokens=False)
    ids = list(bos_prefix(tokenizer)) + words
    start = len(ids) - len(words)
    pieces = [tokenizer.decode([i]) for i in ids[start:]]
    bounds, pos = [], 0
    for piece in pieces:
        bounds.append((pos, pos + len(piece)))
        pos += len(piece)
    out = []
    for d, a, b in spans:
        where = [start + i for i, (lo, hi) in enumerate(bounds) if hi > a and lo < b]
        if where:
            out.append((d, where))
    return ids, out


@torch.no_grad()
def text_anchors(model: MPnPModel, descriptions: Sequence[Sequence[str | None]],
                 layers: Sequence[int], *, text_batch: int = 16,
                 progress: bool = False, autocast: str = "off") -> AnchorTargets:
    """Read every frame's descriptions as a scene and keep each distinct description's mean
    pre-RoPE key and value in each of ``layers`` (module docstring). The base LLM reads
    them: no state is active meanwhile (the previously active one is restored). Its
    forwards run under ``autocast`` (:func:`adapt.precision.autocast_context`); the means are
    summed in float32."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError("text anchors need the model's tokenizer")
    layers = list(layers)
    if not layers:
        raise ValueError("no layers to anchor: connect a modality (N >= 1) first")
    attention = model.attention_modules
    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = [getattr(attention[j], proj).register_forward_hook(
        lambda _m, _a, out, key=(j, proj): captured.__setitem__(key, out))
        for j in layers for proj in ("k_proj", "v_proj")]
    width = model.geometry.kv_width
    sums_k: list[torch.Tensor] = []
    sums_v: list[torch.Tensor] = []
    counts: list[int] = []
    index: dict[str, int] = {}
    t0 = time.perf_counter()
    was_active, was_training = model.active_name, model.training
    model.activate(None)
    model.eval()
    device = model.llm.get_input_embeddings().weight.device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    try:
        batches = range(0, len(descriptions), text_batch)
        for lo in tqdm(batches, desc="anchor targets", unit="batch", disable=not progress):
            rows = [_token_spans(tok, *_scene_text(d)) for d in descriptions[lo:lo + text_batch]]
            rows = [r for r in rows if r[1]]
            if not rows:
                continue
            longest = max(len(ids) for ids, _ in rows)
            ids = torch.full((len(rows), longest), pad, dtype=torch.long)
            mask = torch.zeros(len(rows), longest, dtype=torch.long)
            for i, (row, _) in enumerate(rows):
                ids[i, :len(row)] = torch.tensor(row)
                mask[i, :len(row)] = 1
            with autocast_context(autocast, torch.device(device)):
                model.llm(input_ids=ids.to(device), attention_mask=mask.to(device),
                          use_cache=False)
            for i, (_, spans) in enumerate(rows):
                for d, where in spans:
                    if d not in index:
                        index[d] = len(counts)
                        counts.append(0)
                        sums_k.append(torch.zeros(len(layers), width))
                        sums_v.append(torch.zeros(len(layers), width))
                    u = index[d]
                    counts[u] += 1
                    for bj, j in enumerate(layers):
                        sums_k[u][bj] += captured[(j, "k_proj")][i, where].float().mean(0).cpu()
                        sums_v[u][bj] += captured[(j, "v_proj")][i, where].float().mean(0).cpu()
    finally:
        for h in hooks:
            h.remove()
        model.activate(was_active)
        model.train(was_training)
    if not counts:
        raise ValueError("no token descriptions to anchor on (every token said nothing)")
    n = torch.tensor(counts, dtype=torch.float32)[:, None, None]
    seconds = time.perf_counter() - t0
    log.info("anchor targets: %d descriptions from %d frames in %.0f s", len(counts),
             len(descriptions), seconds)
    return AnchorTargets(index, torch.stack(sums_k) / n, torch.stack(sums_v) / n, layers,
                         len(descriptions), seconds)


def anchor_aligners(model: MPnPModel, modality: str, tokens: torch.Tensor,
                    target_ids: torch.Tensor, targets: AnchorTargets,
                    config: AnchorConfig | None = None, *, progress: bool = False,
                    autocast: str = "off") -> AnchorReport:
    """Regress the active state's ``modality`` aligners (and per-block maps) so each token's
    keys and values in each of ``targets.layers`` match its description's. The forward and
    backward of each step run under ``autocast`` (the aligners and Adam stay float32).

    Args:
        tokens: ``(F, T, D)`` frozen encoder tokens of the frames.
        target_ids: ``(F, T)`` each token's row in ``targets`` (-1: not fitted), from
            :meth:`AnchorTargets.ids`.
    """
    config = config or AnchorConfig()
    state = model.state
    if state is None or modality not in state.aligners:
        raise ValueError(f"the active state has no aligners for {modality!r}")
    if tokens.ndim != 3 or target_ids.shape != tokens.shape[:2]:
        raise ValueError(f"tokens {tuple(tokens.shape)} and target ids "
                         f"{tuple(target_ids.shape)} do not match")
    fitted = target_ids >= 0
    if not fitted.any():
        raise ValueError(f"{modality}: no token has a description to anchor on")
    aligner = state.aligners[modality]
    device = next(aligner.parameters()).device
    tk, tv = targets.keys.to(device), targets.values.to(device)
    # Normalise each block's error by its targets' RMS: blocks differ in scale by 10x.
    scale_k = tk.pow(2).mean(dim=(0, 2)).sqrt().clamp(min=1e-6)
    scale_v = tv.pow(2).mean(dim=(0, 2)).sqrt().clamp(min=1e-6)
    projections = [model.block_projection(j) for j in targets.layers]
    params = list(aligner.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    t0 = time.perf_counter()
    was_training = aligner.training
    aligner.train()
    key_err = value_err = math.nan
    for _ in tqdm(range(config.steps), desc=f"anchor {modality}", unit="step",
                  disable=not progress):
        rows = torch.randint(0, len(tokens), (config.batch_size,), generator=generator)
        x = tokens[rows].to(device).float()
        ids = target_ids[rows].to(device)
        keep = ids >= 0
        if not keep.any():
            continue
        with autocast_context(autocast, device):
            u_k, u_v = aligner(x)
            lk = lv = torch.zeros((), device=device)
            for bj, (j, project) in enumerate(zip(targets.layers, projections)):
                k, v = aligner.block_kv(j, u_k, u_v, project)  # (B, n_kv, T, hd)
                k = k.transpose(1, 2).flatten(2)[keep].float()
                v = v.transpose(1, 2).flatten(2)[keep].float()
                lk = lk + ((k - tk[ids[keep], bj]) / scale_k[bj]).pow(2).mean()
                lv = lv + ((v - tv[ids[keep], bj]) / scale_v[bj]).pow(2).mean()
            lk, lv = lk / len(targets.layers), lv / len(targets.layers)
        optimizer.zero_grad(set_to_none=True)
        (lk + lv).backward()
        optimizer.step()
        key_err, value_err = float(lk.detach()), float(lv.detach())
    aligner.train(was_training)
    for p in params:
        p.grad = None
    seconds = time.perf_counter() - t0
    report = AnchorReport(modality, config.steps, int(fitted.sum()), round(key_err, 4),
                          round(value_err, 4), round(seconds, 1), len(targets.index),
                          round(targets.seconds, 1))
    log.info("anchored %s aligners: K nMSE %.3f, V nMSE %.3f after %d steps (%.0f s)",
             modality, key_err, value_err, config.steps, seconds)
    return report


def anchor_modality(model: MPnPModel, modality: str, encoder, frames: Sequence,
                    tokens: torch.Tensor, config: AnchorConfig | None = None, *,
                    progress: bool = False, autocast: str = "off") -> AnchorReport:
    """Both steps for one modality of the active state: its encoder describes each frame's
    tokens, the LLM reads the descriptions in the state's connected blocks, the aligners are
    fitted. ``tokens``: ``(F, T, D)`` the encoder's tokens of ``frames``, in order."""
    config = config or AnchorConfig()
    state = model.state
    if state is None or not state.connected_layers():
        raise ValueError("anchoring needs an active state with connected blocks")
    if len(frames) != len(tokens):
        raise ValueError(f"{len(frames)} frames but {len(tokens)} token rows")
    generator = torch.Generator().manual_seed(config.seed)
    pick = torch.randperm(len(frames), generator=generator)[:config.frames].tolist()
    descriptions = [encoder.describe_tokens(frames[i]) for i in pick]
    targets = text_anchors(model, descriptions, state.connected_layers(),
                           text_batch=config.text_batch, progress=progress, autocast=autocast)
    return anchor_aligners(model, modality, tokens[pick], targets.ids(descriptions), targets,
                           config, progress=progress, autocast=autocast)
