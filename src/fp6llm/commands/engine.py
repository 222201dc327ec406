"""`fp6llm generate`, `fp6llm bench`, `fp6llm eval`: text generation, end-to-end throughput, perplexity."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import command

CONTROL_CHARACTERS = {c: f"\\x{c:02x}" for c in range(32) if chr(c) not in "\n\t"} | {0x7F: "\\x7f"}


def _model_arguments(parser: argparse.ArgumentParser, formats: bool = False) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="DIR", help="a Hugging Face checkpoint or an fp6llm packed checkpoint "
                                                       "(default: the embedded stdlib-lm-e3m2)")
    source.add_argument("--random", metavar="NAME", help="random weights of a named shape (llama-2-7b, tiny-llama, "
                                                         "...); a byte tokenizer, no downloads")
    if formats:
        parser.add_argument("--formats", default=formats, help=f"comma-separated formats (default {formats})")
    else:
        parser.add_argument("--format", default=None, help="weight format: e3m2 (FP6), any eXmY, or fp16 / bf16 / "
                                                           "fp32 (default e3m2; a packed checkpoint's own)")
    parser.add_argument("--group-size", type=int, default=None, help="one scale per this many input columns "
                                                                     "(default: one per output channel)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def _tp_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=1, metavar="N",
                        help="tensor-parallel degree: N GPUs each hold 1/N of every block; launch with torchrun "
                             "--nproc-per-node N -m fp6llm ... --tp N (default 1: one process, no torch.distributed)")


def _quiet(*args, **kwargs) -> None:
    """print for ranks other than 0, which say nothing."""


def _source(args):
    from ..engine.load import ModelSource
    return ModelSource.random(args.random) if args.random else ModelSource.parse(args.model)  # None: default


def _format_list(text: str) -> list:
    from ..engine.load import check_format
    names = [check_format(name.strip()) for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(f"no formats in {text!r}")
    return names


def _int_list(text: str, what: str) -> list:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{what} must be comma-separated positive integers, got {text!r}")
    return values


def printable(text: str) -> str:
    """Text safe for a terminal: control characters (a random model emits them) as \\xNN escapes."""
    return text.translate(CONTROL_CHARACTERS)


# ---- generate -------------------------------------------------------------------------------------------------------

@command("generate", "generate text from prompts; streams the tokens of a single prompt as they come")
def _generate_args(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    parser.add_argument("--prompt-file", help="a file of prompts, one per line (blank lines skipped)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="prompt i samples with seed + i")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (KV cache rows)")
    parser.add_argument("--no-cuda-graph", action="store_true", help="run decode steps eagerly on CUDA too")
    _tp_argument(parser)
    parser.set_defaults(run=_generate)


def _read_prompts(args) -> list:
    prompts = list(args.prompt)
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist")
        prompts += [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompt: give --prompt TEXT (repeatable) or --prompt-file FILE")
    return prompts


def _generate(args) -> None:
    from ..tp import process_group

    with process_group(args.tp, args.device) as (tp, device):
        _generate_on(args, tp, device)


def _generate_on(args, tp, device) -> None:
    """generate as tensor-parallel rank tp (None: alone) on device; rank 0 prints."""
    import torch

    from ..tp import shared_seed

    from ..engine import DoesNotFit, Engine, SamplingParams
    from ..engine.generate import check_length
    from ..engine.load import check_fits

    prompts = _read_prompts(args)
    SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)  # bad settings fail before loading
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    source = _source(args)
    fmt, group_size = source.weight_format(args.format, args.group_size)
    config = source.config()
    tokenizer = source.tokenizer(config)
    # The cache holds what the longest prompt needs: every prompt is checked before the model loads.
    lengths = [len(tokenizer.encode(p)) for p in prompts]
    for i, length in enumerate(lengths):
        check_length(length, args.max_new_tokens, config.max_position_embeddings, config.max_position_embeddings,
                     f"prompt {i}" if len(prompts) > 1 else "the prompt")
    seq_len = max(lengths) + args.max_new_tokens
    batch = min(args.batch_size, len(prompts))
    check_fits(config, fmt, group_size, device, None, batch, seq_len, tp)
    rank0 = tp is None or tp.rank == 0
    say = print if rank0 else _quiet
    # Every rank must sample the same tokens: one seed for all of them.
    seed = args.seed if tp is None or args.temperature == 0 else shared_seed(tp, args.seed)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=seed)
    try:
        engine = Engine(source.load_model(fmt, group_size, device, progress=rank0, tp=tp), tokenizer, batch,
                        seq_len, cuda_graph=not args.no_cuda_graph)
        if len(prompts) == 1:
            say(printable(prompts[0]), end="", flush=True)
            engine.generate(prompts, **kwargs, stream=lambda d: say(printable(d.text), end="", flush=True))
            say()
        else:
            for i, completion in enumerate(engine.generate(prompts, **kwargs)):
                say(f"--- {i}: {printable(prompts[i])}{printable(completion)}")
    except torch.cuda.OutOfMemoryError as err:  # beyond the estimate: activations, fragmentation
        raise DoesNotFit(f"out of GPU memory with batch {batch} x {seq_len} positions (try a smaller "
                         f"--batch-size or --max-new-tokens): {str(err).splitlines()[0]}") from None
    say(engine.stats.summary())


# ---- bench ----------------------------------------------------------------------------------------------------------

@command("bench", "end-to-end prefill / decode throughput per format and batch size, against the copy-bandwidth "
                  "floor; writes e2e-<device>-<date>.md/.json")
def _bench_args(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser, formats="fp16,e3m2,e2m2")
    parser.add_argument("--batch", default="1,8,32,128", help="comma-separated batch sizes (default 1,8,32,128)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--out", default="bench/results", help="directory for the results (default bench/results)")
    parser.add_argument("--no-cuda-graph", action="store_true", help="time eager decode steps on CUDA too")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (one compilation "
                                                               "per batch size; minutes on large models)")
    _tp_argument(parser)
    parser.set_defaults(run=_bench)


def _bench(args) -> None:
    from ..engine import bench
    from ..tp import process_group

    formats, batches = _format_list(args.formats), _int_list(args.batch, "--batch")
    if args.prompt_len < 1 or args.gen_len < 2:
        raise ValueError(f"need --prompt-len >= 1 and --gen-len >= 2, got {args.prompt_len} and {args.gen_len}")
    source = _source(args)
    limit = source.config().max_position_embeddings
    if args.prompt_len + args.gen_len > limit:
        raise ValueError(f"--prompt-len {args.prompt_len} + --gen-len {args.gen_len} = "
                         f"{args.prompt_len + args.gen_len} is beyond the model's max_position_embeddings {limit}")
    with process_group(args.tp, args.device) as (tp, device):
        result = bench.run_bench(source, formats, batches, args.prompt_len, args.gen_len, device, args.group_size,
                                 cuda_graph=not args.no_cuda_graph, compile=args.compile,
                                 progress=tp is None or tp.rank == 0, tp=tp)
    if tp is not None and tp.rank != 0:
        return
    print(bench.format_table(result))
    for path in bench.write_results(result, args.out):
        print(f"wrote {path}")


# ---- eval -----------------------------------------------------------------------------------------------------------

@command("eval", "perplexity of each format on a text file, and its argmax agreement with the fp16 reference")
def _eval_args(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser, formats="fp16,e3m2,e2m3,e2m2,e2m1")
    parser.add_argument("--text", required=True, metavar="FILE", help="a UTF-8 text file")
    parser.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens of the text")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    parser.set_defaults(run=_eval)


def _eval(args) -> None:
    from ..engine import perplexity

    formats = _format_list(args.formats)
    path = Path(args.text)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    result = perplexity.run_eval(_source(args), formats, path.read_text(encoding="utf-8"), args.ctx, args.max_tokens,
                                 args.device, args.group_size, args.batch_size)
    print(perplexity.format_table(result))
