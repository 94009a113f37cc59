"""The ``mpnp`` command line.

Each area of the project contributes its own sub-commands through a module with an
``add_commands(subparsers)`` function, listed in :data:`COMMAND_MODULES`; this file only
assembles them, so areas never edit each other's CLI code. A sub-command sets
``func(args) -> int`` on its parser.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning. The daemon shares the CPU with the vehicle
# stack (and, here, benchmarks share two cores): spinning workers of an oversubscribed CPU
# made training steps up to 50x slower in our measurements. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import importlib  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

from mpnp import __version__

#: Modules that contribute sub-commands (each defines ``add_commands(subparsers)``).
COMMAND_MODULES: tuple[str, ...] = (
    "mpnp.llm_cli",
    "scenes.cli",
    "encoders.cli",
    "adapt.cli",
    "adapt.compose_cli",
    "bench.cli",
    "daemon.cli",
    "recording.cli",
)

log = logging.getLogger("mpnp")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpnp", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mpnp {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # Only tolerate the area's own CLI module being absent, never a broken import.
            if exc.name != name:
                raise
            continue
        module.add_commands(sub)
    return parser


def setup_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * min(verbosity + 1, 2)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        # Errors meant for people: one clear line, no traceback (use -vv for one).
        if args.verbose >= 2:
            raise
        print(f"mpnp: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
