"""nuScenes-QA style questions generated from a frame's scene graph, with answer balancing.

The scene graph is the set of annotated objects with class, status and the relation of every
object to every other: the direction from one to the other in the ego frame, in six sectors
(front, front left, back left, back, back right, front right) as in nuScenes-QA. Templates:
exist, count, object, status and comparison, each with 0 hops (about the whole scene) and
1 hop (about the objects in one direction from a uniquely described reference object).

Balancing: every frame yields a *pool* of all answerable questions; :func:`select_balanced`
then picks a few per frame so that, per template and per question text, the answers come out
as even as possible (CLEVR-style). Without it a question-only model would learn that "Are
there any cars?" is nearly always "yes".
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from mpnp.answers import ANSWER_VOCAB, QUESTION_TYPES
from scenes import layout as L
from scenes.sample import ObjectAnnotation, QAItem

RELATIONS = ("front", "front left", "back left", "back", "back right", "front right")
MAX_COUNT = 10
#: Statuses that give the class away ("What is the standing thing?" is always a pedestrian),
#: so object questions do not use them.
_PEDESTRIAN_ONLY = ("standing", "not standing")
_PLURAL = {"bus": "buses", "thing": "things"}


@dataclass(frozen=True)
class Candidate:
    question: str
    answer: str
    template_type: str
    num_hop: int
    #: What balancing groups by, besides the full text: e.g. the question minus its reference
    #: object, or the words a question-only model could latch on to ("|"-separated keys).
    key: str = ""

    @property
    def balance_keys(self) -> tuple[str, ...]:
        return (self.question, *(k for k in self.key.split("||") if k))


def _plural(name: str) -> str:
    return _PLURAL.get(name, name + "s")


def noun_phrase(category: str | None, status: str | None, plural: bool) -> str:
    """'parked cars', 'pedestrian that is not standing', 'things with riders', ..."""
    base = category or "thing"
    base = _plural(base) if plural else base
    if status is None:
        return base
    if status == "not standing":
        return f"{base} that {'are' if plural else 'is'} not standing"
    if status in ("with rider", "without rider"):
        word = status.split()[0]
        return f"{base} {word} {'riders' if plural else 'a rider'}"
    return f"{status} {base}"


def _filters() -> list[tuple[str | None, str | None]]:
    out: list[tuple[str | None, str | None]] = []
    for name, spec in L.CLASSES.items():
        out.append((name, None))
        out.extend((name, s) for s in spec.statuses)
    statuses = sorted({s for spec in L.CLASSES.values() for s in spec.statuses})
    out.extend((None, s) for s in statuses)
    out.append((None, None))  # "things": only asked about with a relation (1 hop)
    return out


FILTERS = _filters()


def sector_index(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Index into RELATIONS of the direction (dx, dy) (front = +x, left = +y)."""
    angle = np.degrees(np.arctan2(dy, dx))  # (-180, 180], counter-clockwise from front
    return (np.floor((angle + 30.0) / 60.0).astype(np.int64)) % 6


class SceneGraph:
    """Objects of one frame with their filter memberships and pairwise relations."""

    def __init__(self, objects: list[ObjectAnnotation]):
        self.objects = objects
        n = len(objects)
        self.cats = np.array([o.category for o in objects], dtype=object)
        self.stats = np.array([o.status for o in objects], dtype=object)
        xy = np.array([o.center[:2] for o in objects], dtype=np.float64).reshape(n, 2)
        # sector[i, j]: direction of object i as seen from object j.
        self.sector = sector_index(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1])
        np.fill_diagonal(self.sector, -1)
        self.member = np.array([
            [(c is None or o.category == c) and (s is None or o.status == s) for o in objects]
            for c, s in FILTERS
        ], dtype=bool).reshape(len(FILTERS), n)
        self.counts = self.member.sum(axis=1)

    def references(self) -> list[tuple[int, str, tuple[str, str | None]]]:
        """Objects that a phrase picks out uniquely: (index, 'the parked car', filter)."""
        out = []
        for f, (cat, status) in enumerate(FILTERS):
            if cat is None or self.counts[f] != 1:
                continue
            if status is not None and self.counts[FILTERS.index((cat, None))] == 1:
                continue  # "the car" already names it
            j = int(np.flatnonzero(self.member[f])[0])
            out.append((j, "the " + noun_phrase(cat, status, plural=False), (cat, status)))
        return out

    def status_of(self, mask: np.ndarray) -> str | None:
        """The one status shared by all objects in ``mask`` (None if none or mixed)."""
        values = set(self.stats[mask])
        return values.pop() if len(values) == 1 and mask.any() else None


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def candidate_pool(objects: list[ObjectAnnotation]) -> list[Candidate]:
    """Every answerable question about these objects (answers in :data:`ANSWER_VOCAB`)."""
    g = SceneGraph(objects)
    pool: list[Candidate] = []
    add = pool.append
    # A tuple in class order, not a set: string hashes change with PYTHONHASHSEED, and the
    # pool's order decides which candidates the balancer picks.
    has_status = tuple(name for name, spec in L.CLASSES.items() if spec.statuses)
    # ---- 0 hops: the whole scene.
    for f, (cat, status) in enumerate(FILTERS):
        if cat is None and status is None:
            continue
        n = int(g.counts[f])
        plural = noun_phrase(cat, status, plural=True)
        add(Candidate(f"Are there any {plural}?", _yes(n > 0), "exist", 0))
        if n <= MAX_COUNT:
            add(Candidate(f"How many {plural} are there?", str(n), "count", 0))
        if cat is None and status not in (None, *_PEDESTRIAN_ONLY) and n > 0:
            kinds = set(g.cats[g.member[f]])
            if len(kinds) == 1:
                add(Candidate(f"What is the {noun_phrase(None, status, False)}?", kinds.pop(),
                              "object", 0))
        if cat in has_status and status is None:
            shared = g.status_of(g.member[f])
            if shared is not None:
                add(Candidate(f"What status is the {cat}?", shared, "status", 0))
    class_filters = [f for f, (c, s) in enumerate(FILTERS) if c is not None and s is None]
    for a in class_filters:
        for b in class_filters:
            if a == b or g.counts[a] > MAX_COUNT or g.counts[b] > MAX_COUNT:
                continue
            if g.counts[a] == 0 and g.counts[b] == 0:
                continue
            na = noun_phrase(FILTERS[a][0], None, True)
            nb = noun_phrase(FILTERS[b][0], None, True)
            ca, cb = g.counts[a], g.counts[b]
            add(Candidate(f"Is the number of {na} greater than the number of {nb}?",
                          _yes(ca > cb), "comparison", 0, f"greater||{na}|1||{nb}|2"))
            add(Candidate(f"Is the number of {na} less than the number of {nb}?",
                          _yes(ca < cb), "comparison", 0, f"less||{na}|1||{nb}|2"))
            if a < b:
                add(Candidate(f"Are there the same number of {na} and {nb}?", _yes(ca == cb),
                              "comparison", 0, f"same||{na}|1||{nb}|2"))
    # ---- 1 hop: objects in one direction from a reference object.
    uniform_status = {c: g.status_of(g.member[FILTERS.index((c, None))]) for c in has_status}
    for j, ref, ref_filter in g.references():
        for r, rel in enumerate(RELATIONS):
            in_dir = g.sector[:, j] == r  # (N,) excludes j itself
            where = f"to the {rel} of {ref}"
            for f, (cat, status) in enumerate(FILTERS):
                mask = g.member[f] & in_dir
                n = int(mask.sum())
                other = "other " if cat is not None and cat == ref_filter[0] else ""
                plural = other + noun_phrase(cat, status, plural=True)
                key = f"{plural}|{rel}||{plural}||{ref}"
                add(Candidate(f"Are there any {plural} {where}?", _yes(n > 0), "exist", 1,
                              "exist|" + key.replace("||", "||exist|")))
                if n <= MAX_COUNT:
                    add(Candidate(f"How many {plural} are {where}?", str(n), "count", 1,
                                  "count|" + key.replace("||", "||count|")))
                if cat is None and status not in _PEDESTRIAN_ONLY and n > 0:
                    kinds = set(g.cats[mask])
                    if len(kinds) == 1:
                        thing = noun_phrase(None, status, False)
                        add(Candidate(f"What is the {thing} that is {where}?", kinds.pop(),
                                      "object", 1, f"object|{thing}|{rel}"))
                if cat in has_status and status is None and n > 0:
                    shared = g.status_of(mask)
                    if shared is None:
                        continue
                    add(Candidate(f"What status is the {cat} that is {where}?", shared,
                                  "status", 1, f"status|{cat}"))
                    for other_cat, other_status in uniform_status.items():
                        if other_status is None or other_cat in (cat, ref_filter[0]):
                            continue
                        add(Candidate(
                            f"Does the {cat} that is {where} have the same status as the "
                            f"{other_cat}?", _yes(shared == other_status), "comparison", 1,
                            f"comparison|{cat}|{other_cat}"))
    return pool


class AnswerBalancer:
    """Picks questions frame after frame so that, per template and per question text, the
    answers come out as even as possible (CLEVR-style).

    It keeps only answer counts, never the pools, so a world of any size is balanced in one
    pass with bounded memory: :func:`scenes.synthetic.generate_world` feeds it each frame's
    pool as the frame is generated. The result depends only on the order of the pools and
    on ``rng``.

    Slots cycle through the template types (and 0/1 hops) in a random order per frame. For
    each slot a candidate minimises how often its answer was already chosen for the same
    question text and for the same template (relative to that template's mean), so that e.g.
    yes/no end near 50/50 and counts spread instead of piling on small numbers.
    """

    def __init__(self, rng: np.random.Generator, max_per_slot: int = 80) -> None:
        self.rng = rng
        self.max_per_slot = max_per_slot
        self.by_text: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.by_slot: dict[tuple[str, int], dict[str, int]] = defaultdict(
            lambda: defaultdict(int))

    def pick(self, pool: list[Candidate], per_frame: int) -> list[Candidate]:
        """Up to ``per_frame`` distinct questions of one frame's pool."""
        rng = self.rng
        grouped: dict[tuple[str, int], list[Candidate]] = defaultdict(list)
        for cand in pool:
            grouped[(cand.template_type, cand.num_hop)].append(cand)
        slots = [(t, h) for t in QUESTION_TYPES for h in (0, 1)]
        order = [slots[i] for i in rng.permutation(len(slots))]
        picked: list[Candidate] = []
        seen: set[str] = set()
        attempts = 0
        # Four passes over the slots per round of picks a frame needs.
        limit = 4 * len(slots) * max(1, math.ceil(per_frame / len(slots)))
        while len(picked) < per_frame and attempts < limit:
            slot = order[attempts % len(order)]
            attempts += 1
            options = [c for c in grouped.get(slot, ()) if c.question not in seen]
            if not options:
                continue
            if len(options) > self.max_per_slot:
                options = [options[i] for i in rng.choice(len(options), self.max_per_slot,
                                                          replace=False)]
            counts = self.by_slot[slot]
            mean = (sum(counts.values()) / max(len(counts), 1)) if counts else 0.0
            scores = [
                sum(self.by_text[k][c.answer] for k in c.balance_keys)
                + (counts.get(c.answer, 0) - mean) / (mean + 1)
                + 0.01 * rng.random()
                for c in options
            ]
            best = options[int(np.argmin(scores))]
            picked.append(best)
            seen.add(best.question)
            for k in best.balance_keys:
                self.by_text[k][best.answer] += 1
            counts[best.answer] += 1
        return picked


def select_balanced(
    pools: list[list[Candidate]],
    per_frame: int,
    rng: np.random.Generator,
    max_per_slot: int = 80,
) -> list[list[Candidate]]:
    """Pick ``per_frame`` questions from each frame's pool with one :class:`AnswerBalancer`."""
    balancer = AnswerBalancer(rng, max_per_slot)
    return [balancer.pick(pool, per_frame) for pool in pools]


def to_qa_items(frame_id: str, candidates: list[Candidate]) -> list[QAItem]:
    items = []
    for c in candidates:
        if c.answer not in ANSWER_VOCAB:
            raise ValueError(f"generated answer {c.answer!r} is outside ANSWER_VOCAB")
        items.append(QAItem(frame_id, c.question, c.answer, c.template_type, c.num_hop))
    return items
