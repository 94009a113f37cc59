"""Statistics of a dataset on disk: what ``mpnp scenes stats`` prints and scenes/README.md quotes.

Per split and light kind: scenes, frames and questions; questions per template type and hop;
the answer distribution per template; how many test/val question texts also occur in the
train split (a question-only model can memorise those); and the blind baselines (majority
answer per type, naive-Bayes question-only) that every sensor model has to beat.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from mpnp.answers import QUESTION_TYPES
from scenes.baselines import QuestionOnlyModel, accuracy, majority_baseline
from scenes.dataset import SPLITS, QADataset

#: Light kinds of a split, as ``QADataset.filter`` takes them.
KINDS: tuple[tuple[str, bool], ...] = (("day", False), ("night", True))


def _type_hop_counts(data: QADataset) -> dict[str, int]:
    counts = Counter(f"{q.template_type}/H{q.num_hop}" for q in data.items)
    return {f"{t}/H{h}": counts.get(f"{t}/H{h}", 0) for t in QUESTION_TYPES for h in (0, 1)}


def _answer_shares(data: QADataset, top: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for template in QUESTION_TYPES:
        answers = Counter(q.answer for q in data.items if q.template_type == template)
        total = sum(answers.values())
        if total:
            out[template] = {a: round(n / total, 3) for a, n in answers.most_common(top)}
    return out


def world_statistics(root: str | Path, top_answers: int = 6) -> dict:
    """Everything ``mpnp scenes stats`` prints, as a JSON-ready dict."""
    splits = {s: QADataset.load(root, s) for s in SPLITS}
    train_texts = {q.question for q in splits["train"].items}
    out: dict = {"root": str(root), "splits": {}}
    for split, data in splits.items():
        row: dict = {}
        for kind, night in KINDS:
            part = data.filter(night=night)
            texts = [q.question for q in part.items]
            row[kind] = {
                "scenes": len({part.frame_info(f).scene_id for f in part.frame_ids}),
                "frames": len(part.frame_ids),
                "questions": len(part),
                "per_type_hop": _type_hop_counts(part),
                "answers": _answer_shares(part, top_answers),
                "distinct_texts": len(set(texts)),
            }
            if split != "train" and texts:
                row[kind]["texts_seen_in_train"] = round(
                    sum(t in train_texts for t in texts) / len(texts), 3)
        out["splits"][split] = row
    train = splits["train"].items
    model = QuestionOnlyModel().fit(train)
    out["baselines"] = {}
    for split in ("val", "test"):
        for kind, night in KINDS:
            part = splits[split].filter(night=night).items
            if not part:
                continue
            majority = majority_baseline(train, part)
            blind = accuracy(part, model.predict(part))
            out["baselines"][f"{split}/{kind}"] = {
                "questions": len(part),
                "majority": round(majority.overall, 4),
                "question_only": round(blind.overall, 4),
                "question_only_per_type": {t: round(v, 4) for t, v in blind.per_type.items()},
            }
    return out


def format_statistics(stats: dict) -> str:
    """The human-readable report of :func:`world_statistics`."""
    lines = [f"dataset {stats['root']}"]
    lines.append(f"{'split':6s} {'kind':6s} {'scenes':>7s} {'frames':>7s} {'questions':>10s} "
                 f"{'distinct':>9s} {'in train':>9s}")
    for split, row in stats["splits"].items():
        for kind, r in row.items():
            seen = r.get("texts_seen_in_train")
            lines.append(f"{split:6s} {kind:6s} {r['scenes']:7d} {r['frames']:7d} "
                         f"{r['questions']:10d} {r['distinct_texts']:9d} "
                         f"{'' if seen is None else f'{seen:.1%}':>9s}")
    lines.append("questions per type/hop (train, day + night):")
    train = stats["splits"]["train"]
    cells = []
    for key in train["day"]["per_type_hop"]:
        total = train["day"]["per_type_hop"][key] + train["night"]["per_type_hop"][key]
        cells.append(f"{key}={total}")
    lines.append("  " + " ".join(cells))
    lines.append("answer shares per template (train, day):")
    for template, shares in train["day"]["answers"].items():
        lines.append(f"  {template:10s} " + ", ".join(f"{a}:{p:.2f}" for a, p in shares.items()))
    lines.append("blind baselines (trained on train):")
    for where, b in stats["baselines"].items():
        per_type = " ".join(f"{t}={v:.3f}" for t, v in b["question_only_per_type"].items())
        lines.append(f"  {where:11s} n={b['questions']:5d} majority={b['majority']:.3f} "
                     f"question-only={b['question_only']:.3f} ({per_type})")
    return "\n".join(lines)
