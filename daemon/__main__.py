"""``python -m daemon --config FILE``: the daemon alone, without the other areas' commands.

Same as ``mpnp daemon`` but imports only what the daemon needs (a fast start for tests and
process supervisors); ``-v`` for INFO logs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# Passive OpenMP waits (as `mpnp` sets): spinning threads starve the IO threads on few cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from daemon.cli import cmd_daemon


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="daemon config (.toml or .json)")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return cmd_daemon(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"python -m daemon: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
