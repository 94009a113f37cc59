"""Training-free model composition: one multi-modality state from per-modality states.

"Model Composition for Multimodal LLMs" (arXiv 2402.12750) builds a multimodal model from
models adapted separately to one modality each, at zero training FLOPs. In mPnP terms:

- **Modality parameters** — each modality's key/value aligners and positional embeddings —
  are copied unchanged from the state that carries them.
- **Language-side parameters** — LoRA on ``k_proj``/``v_proj`` and the latent connections
  ``w_j`` — are shared by every modality and must be merged.

mPnP's aligned K/V bypass ``k_proj``/``v_proj``, so the K/V LoRA acts on text tokens only;
mPnP is therefore already *decoupled* in DAMC's sense, and the methods differ only in how the
LoRA of the text tokens is merged:

``naive-ab``  NaiveMC as the authors' code does it: elementwise mean of LoRA's ``A`` and
              ``B`` separately (needs equal rank and ``lora_alpha``). ``mean(B)·mean(A)`` is
              not the mean of the inputs' ``ΔW``.
``naive``     NaiveMC on the weight deltas: ``ΔW = mean_m ΔW_m`` with ``ΔW_m = s_m B_m A_m``.
``damc``      DAMC: ``ΔW = Σ_m λ_m ΔW_m``; λ given, or chosen on validation data by a
              bounded coordinate search (:func:`search_lambdas`).

A weighted sum of rank-r deltas is not rank r in general. It is represented *exactly* as
one LoRA of rank ``R = Σ_m r_m``: ``A = [A_1; …; A_M]`` (stacked rows) and
``B = [c_1 B_1, …, c_M B_M]`` (stacked columns) with ``c_m = w_m s_m / s`` and the composed
scaling ``s = lora_alpha / R`` set to the first input's ``s_1``, so that
``s B A = Σ_m w_m s_m B_m A_m`` up to float rounding. Every weight is folded into ``B`` and
``A`` stays a copy, so a single input with λ = 1 is reproduced bit for bit.

**Inputs with different N** (the ``blocks`` argument). ``"union"`` (default): the composed
state connects the last ``max_m N_m`` blocks; ``"intersection"``: the last ``min_m N_m``
(the deeper inputs' LoRA and connections of the other blocks are dropped). For a connected
block ``j`` let ``P_j`` be the inputs that connect it:

- connection weight: ``w_j = mean_{m∈P_j} w_{m,j}`` — a block only one input connects takes
  that input's value (weights of unconnected blocks never took part in a forward, so they
  carry nothing; blocks outside the composed N get the plain mean, unused unless N grows);
- ``naive`` / ``naive-ab``: the mean is over ``P_j`` as well (a block one input connects
  keeps that input's LoRA as it is);
- ``damc``: the literal ``Σ_m λ_m ΔW_m`` where an input that does not connect block ``j``
  contributes ``ΔW_m = 0`` there — which is what that input's own model applies at ``j``
  (its zero-padded slot in the rank-R factors). λ is not renormalised per block; the search
  picks the scale.

Every connected modality is injected into every composed block (mPnP connects one N for all
modalities of a state): with ``"union"`` the shallower inputs' modalities also reach blocks
their aligners were not trained with. That is the price of a single N; ``"intersection"``
avoids it at the cost of the deeper inputs' blocks.

**What is refused** (:class:`CompositionError`): states made for different LLMs (their
``llm`` fingerprints, :func:`mpnp.llm.llm_mismatch`); connection configs that cannot share
one state (gate, temperature, aligner kind/width, positional embeddings, LoRA on/off; for
``naive-ab`` also LoRA rank and alpha); and two inputs carrying the same modality with
different aligners unless ``prefer`` names which wins — automatically only where exactly one
variant is *connected* (a switch state C → L still carries its disconnected camera
aligners; the camera state's connected ones win over them).

Training-only fields of the connection config (``lora_dropout``, ``train_connections``) are
taken from the first input. Everything here is pure tensor arithmetic on
:class:`aligners.state.StateData` — no model, no data: a daemon calls
``compose_states(states, "naive")`` or ``compose_states(states, "damc", evaluate=fn)``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from aligners.config import ConnectionConfig
from aligners.state import StateData
from mpnp.llm import llm_mismatch

log = logging.getLogger(__name__)

METHODS = ("naive", "naive-ab", "damc")
BLOCK_RULES = ("union", "intersection")
PROJECTIONS = ("k_proj", "v_proj")
#: Connection-config fields every input must share (one composed config holds them).
SHARED_FIELDS = ("gate", "temperature", "aligner_kind", "aligner_hidden_mult",
                 "positional_embeddings", "lora", "aligner_space", "block_maps")
#: λ values the search tries per input (0 drops that input's text-side LoRA altogether).
DEFAULT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_MAX_EVALS = 12


class CompositionError(ValueError):
    """Inputs that cannot be composed (another LLM, conflicting modalities or configs)."""


@dataclass
class ValScore:
    """What a validation callback returns for one candidate (a bare float also works)."""

    accuracy: float
    questions: int | None = None
    flops: float | None = None


@dataclass
class LambdaTrial:
    lambdas: tuple[float, ...]
    accuracy: float
    questions: int | None
    flops: float | None
    seconds: float  # compose + evaluate


@dataclass
class LambdaSearch:
    """The outcome and the full cost of a DAMC λ search."""

    lambdas: tuple[float, ...]
    accuracy: float
    trials: list[LambdaTrial] = field(default_factory=list)
    wall_s: float = 0.0
    max_evals: int = DEFAULT_MAX_EVALS
    grid: tuple[float, ...] = DEFAULT_GRID

    @property
    def evaluations(self) -> int:
        return len(self.trials)

    @property
    def questions(self) -> int | None:
        counts = [t.questions for t in self.trials]
        return None if any(c is None for c in counts) else sum(counts)

    @property
    def flops(self) -> float | None:
        counts = [t.flops for t in self.trials]
        return None if any(c is None for c in counts) else float(sum(counts))

    def to_dict(self) -> dict:
        return {"lambdas": list(self.lambdas), "accuracy": self.accuracy,
                "evaluations": self.evaluations, "questions": self.questions,
                "inference_flops": self.flops, "wall_s": self.wall_s,
                "max_evals": self.max_evals, "grid": list(self.grid),
                "trials": [{**asdict(t), "lambdas": list(t.lambdas)} for t in self.trials]}


Evaluate = Callable[[StateData], "ValScore | float"]


# --------------------------------------------------------------------------- checks


def _check_inputs(states: Sequence[StateData], method: str, blocks: str) -> None:
    if method not in METHODS:
        raise CompositionError(f"method must be one of {METHODS}, got {method!r}")
    if blocks not in BLOCK_RULES:
        raise CompositionError(f"blocks must be one of {BLOCK_RULES}, got {blocks!r}")
    if not states:
        raise CompositionError("nothing to compose: give at least one state")
    first = states[0]
    for i, s in enumerate(states):
        if not s.connected:
            raise CompositionError(f"input {i} ({s.name!r}) connects no modality")
        if i == 0:
            continue
        diff = llm_mismatch(first.config.get("llm", {}), s.config.get("llm", {}))
        if diff:
            raise CompositionError(
                f"input {i} ({s.name!r}) was made for another LLM than input 0 "
                f"({first.name!r}): they differ in {', '.join(diff)}; only states of the same "
                "LLM compose")
        for key in SHARED_FIELDS + (("lora_r", "lora_alpha") if method == "naive-ab" else ()):
            default = getattr(ConnectionConfig, key, None)  # states saved before the field
            a = first.config["connection"].get(key, default)
            b = s.config["connection"].get(key, default)
            if a != b:
                hint = " (naive-ab averages A and B: use naive or damc)" if key.startswith(
                    "lora_") else ""
                raise CompositionError(
                    f"input {i} ({s.name!r}) has {key}={b!r}, input 0 ({first.name!r}) "
                    f"{key}={a!r}: one composed state cannot hold both{hint}")


def _aligner_tensors(state: StateData, modality: str) -> dict[str, torch.Tensor]:
    prefix = f"aligners.{modality}."
    return {k: v for k, v in state.tensors.items() if k.startswith(prefix)}


def _same_aligners(a: StateData, b: StateData, modality: str) -> bool:
    spec_a = next(m for m in a.config["modalities"] if m["name"] == modality)
    spec_b = next(m for m in b.config["modalities"] if m["name"] == modality)
    if spec_a != spec_b:
        return False
    ta, tb = _aligner_tensors(a, modality), _aligner_tensors(b, modality)
    return ta.keys() == tb.keys() and all(
        ta[k].shape == tb[k].shape and torch.equal(ta[k], tb[k].to(ta[k].dtype)) for k in ta)


def _resolve_modalities(states: Sequence[StateData],
                        prefer: Mapping[str, int] | None) -> dict[str, int]:
    """Which input supplies each modality's aligners (modality -> input index)."""
    prefer = dict(prefer or {})
    carriers: dict[str, list[int]] = {}
    for i, s in enumerate(states):
        for m in s.config["modalities"]:
            carriers.setdefault(m["name"], []).append(i)
    for modality, index in prefer.items():
        if modality not in carriers:
            raise CompositionError(f"prefer names {modality!r}, which no input carries")
        if index not in carriers[modality]:
            raise CompositionError(
                f"prefer says input {index} supplies {modality!r}, but it does not carry it "
                f"(carried by inputs {carriers[modality]})")
    owner = {}
    for modality, idx in carriers.items():
        variants: list[list[int]] = []  # groups of inputs with identical aligners
        for i in idx:
            for group in variants:
                if _same_aligners(states[group[0]], states[i], modality):
                    group.append(i)
                    break
            else:
                variants.append([i])
        if modality in prefer:
            owner[modality] = prefer[modality]
        elif len(variants) == 1:
            owner[modality] = idx[0]
        else:
            live = [g for g in variants if any(modality in states[i].connected for i in g)]
            if len(live) != 1:
                raise CompositionError(
                    f"inputs {idx} carry different aligners for {modality!r}"
                    + (" and more than one connects it" if live else "")
                    + f"; say which wins (prefer={{{modality!r}: INDEX}}, CLI --prefer "
                      f"{modality}=INDEX)")
            owner[modality] = next(i for i in live[0] if modality in states[i].connected)
            log.info("compose: %r from input %d (the only variant that is connected)",
                     modality, owner[modality])
    return owner


# --------------------------------------------------------------------------- merging


def _scaling(connection: Mapping) -> float:
    """peft's LoRA scaling ``lora_alpha / r`` (rsLoRA is never used here)."""
    return float(connection["lora_alpha"]) / float(connection["lora_r"])


def _mean(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    total = tensors[0].to(torch.float32)
    for t in tensors[1:]:
        total = total + t.to(torch.float32)
    return (total / len(tensors)).to(dtype)


def compose_states(
    states: Sequence[StateData],
    method: str = "naive",
    *,
    lambdas: Sequence[float] | None = None,
    evaluate: Evaluate | None = None,
    blocks: str = "union",
    prefer: Mapping[str, int] | None = None,
    name: str = "composed",
    max_evals: int = DEFAULT_MAX_EVALS,
    grid: Sequence[float] = DEFAULT_GRID,
) -> StateData:
    """Compose ``states`` (same LLM, e.g. a camera and a LiDAR state) into one state.

    Args:
        states: the inputs, in a fixed order (λ, ``prefer`` and errors refer to it).
        method: ``"naive"`` (mean ΔW), ``"naive-ab"`` (mean of A and of B) or ``"damc"``
            (``Σ λ_m ΔW_m``); see the module docstring.
        lambdas: DAMC's weights, one per input.
        evaluate: DAMC without ``lambdas``: validation accuracy of a candidate composed
            state; λ is then chosen by :func:`search_lambdas` (``max_evals``, ``grid``) and
            the search's cost is recorded in ``config["composition"]["search"]``.
        blocks: ``"union"`` (N = max of the inputs') or ``"intersection"`` (min).
        prefer: modality -> index of the input whose aligners win a conflict.
        name: the composed state's name.

    Returns:
        A new :class:`StateData`; the inputs are not modified.
    """
    _check_inputs(states, method, blocks)
    search = None
    if method == "damc":
        if lambdas is None and evaluate is None:
            raise CompositionError(
                "damc needs its λ: give lambdas (one per input) or an evaluate callback on "
                "validation data to search them")
        if lambdas is not None and evaluate is not None:
            raise CompositionError("damc: give lambdas or an evaluate callback, not both")
        if lambdas is None:
            search = search_lambdas(states, evaluate, max_evals=max_evals, grid=grid,
                                    blocks=blocks, prefer=prefer)
            lambdas = search.lambdas
        lambdas = tuple(float(x) for x in lambdas)
        if len(lambdas) != len(states) or not all(math.isfinite(x) and x >= 0
                                                   for x in lambdas):
            raise CompositionError(
                f"damc needs one finite λ >= 0 per input ({len(states)}), got {list(lambdas)}")
    elif lambdas is not None or evaluate is not None:
        raise CompositionError(f"lambdas/evaluate are for damc, not {method!r}")
    out = _compose(states, method, lambdas, blocks, prefer, name)
    if search is not None:
        out.config["composition"]["search"] = search.to_dict()
    return out


def _compose(states: Sequence[StateData], method: str, lambdas: tuple[float, ...] | None,
             blocks: str, prefer: Mapping[str, int] | None, name: str) -> StateData:
    started = time.perf_counter()
    first = states[0]
    owner = _resolve_modalities(states, prefer)
    num_layers = int(first.config["llm"]["num_layers"])
    ns = [s.num_blocks for s in states]
    n_out = max(ns) if blocks == "union" else min(ns)
    layers = range(num_layers - n_out, num_layers)

    def present(j: int) -> list[int]:
        return [i for i, n in enumerate(ns) if j >= num_layers - n]

    tensors: dict[str, torch.Tensor] = {}
    # Modality parameters: copied from their owner, as they are.
    specs = []
    for modality, i in owner.items():
        specs.append(next(m for m in states[i].config["modalities"] if m["name"] == modality))
        for key, value in _aligner_tensors(states[i], modality).items():
            tensors[key] = value.clone()
    connected: list[str] = []
    for s in states:
        connected += [m for m in s.connected if m not in connected]

    # Latent connections: mean over the inputs connected at each block.
    conn = [s.tensors["connections.weight"] for s in states]
    dtype = conn[0].dtype
    weight = _mean(conn, dtype)
    for j in layers:
        weight[j] = _mean([conn[i][j] for i in present(j)], dtype)
    tensors["connections.weight"] = weight

    connection = dict(first.config["connection"], num_blocks=n_out)
    if connection["lora"]:
        if method == "naive-ab":
            for j in layers:
                for proj in PROJECTIONS:
                    for part in ("lora_A", "lora_B"):
                        key = f"lora.{j}.{proj}.{part}"
                        ins = [states[i].tensors[key] for i in present(j)]
                        tensors[key] = _mean(ins, ins[0].dtype)
        else:
            connection.update(_merge_deltas(states, method, lambdas, layers, present, tensors))

    config = {
        "name": name,
        "num_blocks": n_out,
        "connection": connection,
        "modalities": specs,
        "connected": connected,
        "llm": first.config["llm"],
        "composition": {
            "method": method,
            "inputs": [s.name for s in states],
            "num_blocks_in": ns,
            "blocks": blocks,
            "lambdas": list(lambdas) if lambdas is not None else None,
            "modality_from": dict(owner),
            "training_flops": 0,
            "compose_s": None,
        },
    }
    config["composition"]["compose_s"] = time.perf_counter() - started
    log.info("composed %s from %s by %s (N=%d) in %.3f s", name, [s.name for s in states],
             method, n_out, config["composition"]["compose_s"])
    return StateData(config, tensors)


def _merge_deltas(states: Sequence[StateData], method: str, lambdas: tuple[float, ...] | None,
                  layers: range, present: Callable[[int], list[int]],
                  tensors: dict[str, torch.Tensor]) -> dict:
    """``Σ_m w_m ΔW_m`` per block as one exact LoRA of rank ``Σ r_m`` (module docstring).

    Writes the factors into ``tensors``; returns the composed ``lora_r``/``lora_alpha``.
    """
    ranks = [int(s.config["connection"]["lora_r"]) for s in states]
    scales = [_scaling(s.config["connection"]) for s in states]
    rank = sum(ranks)
    scale = scales[0]
    alpha = scale * rank
    offsets = [sum(ranks[:i]) for i in range(len(states))]
    for j in layers:
        here = present(j)
        for proj in PROJECTIONS:
            key_a, key_b = f"lora.{j}.{proj}.lora_A", f"lora.{j}.{proj}.lora_B"
            ref_a, ref_b = states[here[0]].tensors[key_a], states[here[0]].tensors[key_b]
            a = torch.zeros(rank, ref_a.shape[1], dtype=ref_a.dtype)
            b = torch.zeros(ref_b.shape[0], rank, dtype=ref_b.dtype)
            for i in here:
                w = 1.0 / len(here) if method == "naive" else lambdas[i]
                coef = w * scales[i] / scale
                rows = slice(offsets[i], offsets[i] + ranks[i])
                a[rows] = states[i].tensors[key_a].to(a.dtype)
                b_i = states[i].tensors[key_b]
                # coef == 1 is copied as it is (exact); otherwise scale in float32.
                b[:, rows] = b_i.to(b.dtype) if coef == 1.0 else (
                    b_i.to(torch.float32) * coef).to(b.dtype)
            tensors[key_a], tensors[key_b] = a, b
    return {"lora_r": rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha}


def lora_delta(state: StateData, layer: int, proj: str) -> torch.Tensor | None:
    """``ΔW = s B A`` of one projection of a state (float64), ``None`` where it has none."""
    key = f"lora.{layer}.{proj}.lora_"
    if key + "A" not in state.tensors:
        return None
    a = state.tensors[key + "A"].to(torch.float64)
    b = state.tensors[key + "B"].to(torch.float64)
    return _scaling(state.config["connection"]) * (b @ a)


# --------------------------------------------------------------------------- DAMC's λ


def search_lambdas(
    states: Sequence[StateData],
    evaluate: Evaluate,
    *,
    max_evals: int = DEFAULT_MAX_EVALS,
    grid: Sequence[float] = DEFAULT_GRID,
    blocks: str = "union",
    prefer: Mapping[str, int] | None = None,
) -> LambdaSearch:
    """Choose DAMC's λ by coordinate search on ``grid``, at most ``max_evals`` evaluations.

    Starts from the authors' hand choice ``λ_m = 1/M``; then, input by input, tries every
    grid value for that input's λ with the others fixed and keeps a strict improvement,
    sweeping until a sweep improves nothing or the budget is spent. Ties keep the earlier
    candidate. ``evaluate`` gets each candidate composed state and returns its accuracy on
    *validation* data (a :class:`ValScore` to also count questions and inference FLOPs);
    this function never sees any data itself.
    """
    if max_evals < 1:
        raise CompositionError(f"max_evals must be >= 1, got {max_evals}")
    grid = tuple(float(g) for g in grid)
    if not grid or not all(math.isfinite(g) and g >= 0 for g in grid):
        raise CompositionError(f"the λ grid must be finite values >= 0, got {list(grid)}")
    _check_inputs(states, "damc", blocks)
    started = time.perf_counter()
    trials: list[LambdaTrial] = []
    seen: dict[tuple[float, ...], float] = {}

    def trial(lams: tuple[float, ...]) -> float:
        t0 = time.perf_counter()
        candidate = _compose(states, "damc", lams, blocks, prefer, "damc-candidate")
        score = evaluate(candidate)
        if not isinstance(score, ValScore):
            score = ValScore(float(score))
        if not math.isfinite(score.accuracy):
            raise CompositionError(f"evaluate returned a non-finite accuracy for λ={lams}")
        trials.append(LambdaTrial(lams, float(score.accuracy), score.questions, score.flops,
                                  time.perf_counter() - t0))
        seen[lams] = float(score.accuracy)
        log.info("damc λ=%s: validation accuracy %.4f", lams, score.accuracy)
        return seen[lams]

    best = tuple(1.0 / len(states) for _ in states)
    best_acc = trial(best)
    improved = True
    while improved and len(trials) < max_evals:
        improved = False
        for m in range(len(states)):
            for g in grid:
                cand = best[:m] + (g,) + best[m + 1:]
                if cand in seen:
                    continue
                if len(trials) >= max_evals:
                    break
                acc = trial(cand)
                if acc > best_acc:
                    best, best_acc, improved = cand, acc, True
    return LambdaSearch(best, best_acc, trials, time.perf_counter() - started, max_evals, grid)
