"""Command-line entry point: ``flowalign <command> ...``. Thin: parses flags and calls the library."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    from .config import DEFAULT_MODEL

    run_demo(args.out, seed=args.seed, steps=args.steps, quick=args.quick, model=args.model or DEFAULT_MODEL)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowalign", description="Align diffusion/flow generators to rewards.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="align the shipped pipeline with Flow-GRPO and write a report folder")
    demo.add_argument("--out", default="demo_out", help="report folder (created)")
    demo.add_argument("--steps", type=int, default=None, help="GRPO iterations (default: the fixed demo budget)")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.add_argument("--quick", action="store_true", help="a <= 2-minute smoke run")
    demo.add_argument("--model", default=None, help="pipeline folder or hub id (default: the shipped one)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # bad input: one clear line, no traceback
        print(f"flowalign: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
