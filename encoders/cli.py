"""``mpnp encoders ...``: list, pretrain, probe and export the frozen encoders."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_PROBE_JSON = "bench/results/encoders_probe.json"
DEFAULT_PROBE_MD = "bench/results/encoders_probe.md"


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser("encoders", help="frozen camera/LiDAR encoders")
    sub = parser.add_subparsers(dest="encoders_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)

    listing = sub.add_parser("list", help="registered encoders and what the model store holds")
    listing.add_argument("--store", help="model store (default: $MPNP_HOME or ~/.cache/mpnp)")
    listing.set_defaults(func=_list)

    pre = sub.add_parser("pretrain", help="pretrain encoders on the synthetic world, freeze, "
                                          "save to the model store")
    _common(pre)
    pre.add_argument("--epochs", type=int, help="override the default epochs")
    pre.add_argument("--slots", type=int, help="object slots per region (camera view / LiDAR "
                     "band; encoders/slots.py); 0 keeps the region-summary tokens")
    pre.add_argument("--force", action="store_true", help="pretrain even if a saved one exists")
    pre.set_defaults(func=_pretrain)

    probe = sub.add_parser("probe", help="linear probes of the frozen tokens (day / night)")
    _common(probe)
    probe.add_argument("--json", type=Path, default=Path(DEFAULT_PROBE_JSON))
    probe.add_argument("--markdown", type=Path, default=Path(DEFAULT_PROBE_MD))
    probe.add_argument("--no-cache", action="store_true", help="do not use the feature cache")
    probe.add_argument("--no-random-baseline", action="store_true",
                       help="skip probing randomly initialised encoders for comparison")
    probe.set_defaults(func=_probe)

    export = sub.add_parser("export", help="export a pretrained encoder's network to ONNX")
    export.add_argument("--kind", required=True)
    export.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    export.add_argument("--store", help="model store")
    export.add_argument("--world", help="world to pretrain on if the encoder is missing")
    export.add_argument("--opset", type=int, default=17)
    export.set_defaults(func=_export)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", default="all", help="an encoder kind, or 'all' (default)")
    parser.add_argument("--world", help="generated world (default: <store>/worlds/default)")
    parser.add_argument("--store", help="model store (default: $MPNP_HOME or ~/.cache/mpnp)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _kinds(kind: str) -> list[str]:
    """The kinds an action works on; "all" means every sensor encoder (the oracle has no
    weights to pretrain and its tokens are objects, not regions, so it is left out)."""
    from encoders import encoder_class, sensor_encoders

    if kind == "all":
        return sensor_encoders()
    encoder_class(kind)  # raises ValueError listing the known kinds
    return [kind]


def _world(args) -> Path:
    from encoders.pretrain import default_world_dir

    return Path(args.world) if args.world else default_world_dir(args.store)


def _list(args) -> int:
    from encoders import create_encoder, list_encoders
    from encoders.base import read_encoder_header
    from encoders.pretrain import RECORD_FILE, encoder_dir

    for kind in list_encoders():
        encoder = create_encoder(kind)
        directory = encoder_dir(kind, args.store)
        state = "not pretrained"
        if (directory / RECORD_FILE).is_file():
            try:
                read_encoder_header(directory)
                record = json.loads((directory / RECORD_FILE).read_text())
                state = f"pretrained ({record.get('fingerprint', '?')[:12]}) in {directory}"
            except (ValueError, OSError) as exc:
                state = f"unreadable in {directory} ({exc})"
        print(f"{kind:16s} {encoder.modality:6s} tokens {encoder.num_tokens:3d} x "
              f"{encoder.dim:4d}  {state}")
    return 0


def _pretrain(args) -> int:
    from encoders.pretrain import PretrainConfig, encoder_dir, ensure_pretrained

    for kind in _kinds(args.kind):
        overrides = {"epochs": args.epochs} if args.epochs else {}
        if args.slots is not None:
            overrides["encoder"] = {"slots": args.slots}
        config = PretrainConfig(**overrides) if overrides else None
        encoder = ensure_pretrained(kind, _world(args), args.store, config,
                                    progress=not args.no_progress, force=args.force)
        record = json.loads((encoder_dir(kind, args.store) / "pretrain.json").read_text())
        print(f"{kind}: {encoder.num_tokens} tokens x {encoder.dim}, pretrained in "
              f"{record['wall_seconds']} s; val {json.dumps(record['val'])}")
    return 0


def _probe(args) -> int:
    from encoders.probe import run_probes, to_markdown

    report = run_probes(_world(args), _kinds(args.kind), args.store,
                        use_cache=not args.no_cache, progress=not args.no_progress,
                        random_baseline=not args.no_random_baseline)
    markdown = to_markdown(report)
    print(markdown)
    for path, text in ((args.json, json.dumps(report, indent=2) + "\n"), (args.markdown, markdown)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {args.json} and {args.markdown}")
    return 0


def _export(args) -> int:
    from encoders.onnx_export import export_onnx
    from encoders.pretrain import stored_or_pretrained

    encoder = stored_or_pretrained(_kinds(args.kind)[0], _world(args), args.store)
    path = export_onnx(encoder, args.out, opset=args.opset)
    print(f"wrote {path} ({encoder.kind}: input {tuple(encoder.example_input(1).shape[1:])}, "
          f"output ({encoder.num_tokens}, {encoder.dim}) per frame)")
    return 0
