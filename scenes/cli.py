"""``mpnp scenes ...``: generate the synthetic world, show a frame, print dataset statistics."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_DATA = "data/scenes"


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser("scenes", help="synthetic driving world and nuScenes-QA data")
    sub = parser.add_subparsers(dest="scenes_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)

    from scenes.synthetic import WORLD_VARIANTS, WorldConfig

    d = WorldConfig()
    gen = sub.add_parser("generate", help="generate the synthetic day/night world to a folder")
    gen.add_argument("--out", required=True, help="output folder (created)")
    gen.add_argument("--variant", choices=sorted(WORLD_VARIANTS), default="default",
                     help="a named world (other seed, object and light distributions); the "
                          "options below override its fields")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--day-frames", type=int, help=f"default {d.day_frames}")
    gen.add_argument("--night-frames", type=int, help=f"default {d.night_frames}")
    gen.add_argument("--frames-per-scene", type=int, help=f"default {d.frames_per_scene}")
    gen.add_argument("--questions-per-frame", type=int,
                     help=f"default {d.questions_per_frame}")
    gen.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                     help=f"default {d.image_height} {d.image_width}")
    gen.add_argument("--lidar-width", type=int, help=f"default {d.lidar_width}")
    gen.add_argument("--workers", type=int, default=None,
                     help="worker processes (default: one per CPU; the output is identical "
                          "for any number)")
    gen.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    gen.set_defaults(func=_generate)

    show = sub.add_parser("show", help="write a PNG of one frame with its questions")
    show.add_argument("--out", required=True, help="PNG path")
    show.add_argument("--data", help="dataset folder; without it a frame is generated")
    show.add_argument("--split", default="test", choices=("train", "val", "test"))
    show.add_argument("--frame", default="0", help="frame id or index in the split")
    show.add_argument("--night", action="store_true",
                      help="without --data: render the frame at night (light 0.05)")
    show.add_argument("--seed", type=int, default=0)
    show.set_defaults(func=_show)

    stats = sub.add_parser("stats", help="scenes, frames, questions per type/hop, answer "
                                         "distributions, repeated texts, blind baselines")
    stats.add_argument("--data", required=True, help="dataset folder")
    stats.add_argument("--json", help="also write the statistics as JSON to this path")
    stats.set_defaults(func=_stats)


def _generate(args: argparse.Namespace) -> int:
    from scenes.synthetic import generate_world, world_variant

    overrides = {k: v for k, v in (
        ("seed", args.seed), ("day_frames", args.day_frames),
        ("night_frames", args.night_frames), ("frames_per_scene", args.frames_per_scene),
        ("questions_per_frame", args.questions_per_frame),
        ("lidar_width", args.lidar_width)) if v is not None}
    if args.image_size is not None:
        overrides.update(image_height=args.image_size[0], image_width=args.image_size[1])
    config = world_variant(args.variant, **overrides)
    path = generate_world(config, args.out, progress=not args.no_progress,
                          workers=args.workers)
    print(f"wrote the synthetic world to {path}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from scenes.show import render_frame_png

    if args.data:
        from scenes.dataset import QADataset

        data = QADataset.load(args.data, args.split)
        ids = data.frame_ids
        if not ids:
            raise ValueError(f"{args.data}: split {args.split} has no frames")
        frame_id = ids[int(args.frame)] if args.frame.isdigit() and args.frame not in ids \
            else args.frame
        if frame_id not in ids:
            raise ValueError(f"{args.data}: no frame {args.frame!r} in split {args.split} "
                             f"(there are {len(ids)}; give an index or an id like {ids[0]})")
        frame = data.frame(frame_id)
        questions = [q for q in data.items if q.frame_id == frame_id]
    else:
        from scenes.synthetic import SyntheticWorld, WorldConfig

        world = SyntheticWorld(WorldConfig(seed=args.seed))
        index = int(args.frame) if args.frame.isdigit() else 0
        scene = "night-0000" if args.night else "day-0000"
        frame, questions = world.make_frame(scene, index, 0.05 if args.night else 1.0)
    out = render_frame_png(frame, questions, Path(args.out))
    print(f"wrote {out}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    import json

    from scenes.stats import format_statistics, world_statistics

    stats = world_statistics(args.data)
    print(format_statistics(stats))
    if args.json:
        Path(args.json).write_text(json.dumps(stats, indent=1))
        print(f"wrote {args.json}")
    return 0
