"""`fp6llm generate`, `fp6llm bench`, `fp6llm eval`: text generation, end-to-end throughput, perplexity."""

from __future__ import annotations

import argparse
from ..cli import (at_least, check_model_arguments, check_output_dir, command, model_arguments, model_source,
                   read_text_file, tp_argument)

CONTROL_CHARACTERS = {c: f"\\x{c:02x}" for c in range(32) if chr(c) not in "\n\t"} | {0x7F: "\\x7f"}


def _quiet(*args, **kwargs) -> None:
    """print for ranks other than 0, which say nothing."""


def _format_list(text: str, group_size, device) -> list:
    """The WeightFormats of a comma-separated --formats (group_size: the quantized ones'), before any work."""
    from ..formats import WeightFormat
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(f"no formats in {text!r}")
    return WeightFormat.parse_list(names, group_size, device)


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
    model_arguments(parser)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    parser.add_argument("--prompt-file", help="a file of prompts, one per line (blank lines skipped)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the K most likely tokens (default: all)")
    parser.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of most likely tokens "
                                                                  "whose probability reaches P, in (0, 1] (default: "
                                                                  "all)")
    parser.add_argument("--seed", type=int, default=None, help="prompt i samples with seed + i")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (KV cache rows; default 8)")
    parser.add_argument("--no-cuda-graph", action="store_true", help="run decode steps eagerly on CUDA too")
    tp_argument(parser)
    parser.set_defaults(run=_generate)


def _read_prompts(args) -> list:
    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += [line for line in read_text_file(args.prompt_file, "--prompt-file").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompt: give --prompt TEXT (repeatable) or --prompt-file FILE")
    return prompts


def _generate(args) -> None:
    check_model_arguments(args)
    at_least("--max-new-tokens", args.max_new_tokens, 1)
    at_least("--top-k", args.top_k, 1, " (leave it out to keep every token)")
    _read_prompts(args)  # before torch.distributed starts
    from ..engine.distributed import process_group

    with process_group(args.tp, args.device) as (tp, device):
        _generate_on(args, tp, device)


def _generate_on(args, tp, device) -> None:
    """generate as tensor-parallel rank tp (None: alone) on device; rank 0 prints."""
    import torch

    from ..engine import DoesNotFit, SamplingParams, load
    from ..engine.distributed import shared_seed
    from ..engine.generate import check_length

    prompts = _read_prompts(args)
    SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)  # bad settings fail before loading
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    source = model_source(args)
    weight_format = source.weight_format(args.format, args.group_size, device=device)  # a bad one fails first
    config = source.config()
    tokenizer = source.tokenizer(config)
    # The cache holds what the longest prompt needs: every prompt is checked before the model loads.
    lengths = [len(tokenizer.encode(p)) for p in prompts]
    for i, length in enumerate(lengths):
        check_length(length, args.max_new_tokens, config.max_position_embeddings, config.max_position_embeddings,
                     f"prompt {i}" if len(prompts) > 1 else "the prompt")
    seq_len = max(lengths) + args.max_new_tokens
    batch = min(args.batch_size, len(prompts))
    rank0 = tp is None or tp.rank == 0
    say = print if rank0 else _quiet
    # Every rank must sample the same tokens: one seed for all of them.
    seed = args.seed if tp is None or args.temperature == 0 else shared_seed(tp, args.seed)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=seed)
    try:
        engine = load(source, weight_format, device=device, max_batch_size=batch, max_seq_len=seq_len,
                      cuda_graph=not args.no_cuda_graph, progress=rank0, tp=tp, tokenizer=tokenizer)
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

# Defaults per device type: a CPU runs the reference path, where the GPU's sizes would take many minutes.
BENCH_BATCHES = {"cuda": "1,8,32,128", "cpu": "1,4"}
BENCH_LENGTHS = {"cuda": (512, 128), "cpu": (64, 16)}  # (prompt, generated) tokens per row


def bench_lengths(prompt_len, gen_len, device_type: str, limit: int) -> tuple:
    """(prompt_len, gen_len): the given ones, checked against the model's ``limit`` positions; a default (None)
    is the device type's, the prompt's cut so that prompt + gen fits the limit."""
    default_prompt, default_gen = BENCH_LENGTHS[device_type]
    gen_len = default_gen if gen_len is None else gen_len
    at_least("--gen-len", gen_len, 2)
    if prompt_len is None:
        prompt_len = min(default_prompt, limit - gen_len)
        if prompt_len < 1:
            raise ValueError(f"--gen-len {gen_len} leaves no room for a prompt in the model's "
                             f"max_position_embeddings {limit}")
    at_least("--prompt-len", prompt_len, 1)
    if prompt_len + gen_len > limit:
        raise ValueError(f"--prompt-len {prompt_len} + --gen-len {gen_len} = {prompt_len + gen_len} is beyond the "
                         f"model's max_position_embeddings {limit}")
    return prompt_len, gen_len


@command("bench", "end-to-end prefill / decode throughput per format and batch size, against the copy-bandwidth "
                  "floor; writes e2e-<device>-<date>.md/.json")
def _bench_args(parser: argparse.ArgumentParser) -> None:
    model_arguments(parser, formats="fp16,e3m2,e2m2")
    parser.add_argument("--batch", default=None, help=f"comma-separated batch sizes (default {BENCH_BATCHES['cuda']}; "
                                                      f"{BENCH_BATCHES['cpu']} on a CPU)")
    parser.add_argument("--prompt-len", type=int, default=None,
                        help=f"prompt tokens per row (default {BENCH_LENGTHS['cuda'][0]}, {BENCH_LENGTHS['cpu'][0]} on "
                             f"a CPU; less when prompt + gen would pass the model's positions)")
    parser.add_argument("--gen-len", type=int, default=None, help=f"new tokens per row (default "
                                                                  f"{BENCH_LENGTHS['cuda'][1]}, "
                                                                  f"{BENCH_LENGTHS['cpu'][1]} on a CPU)")
    parser.add_argument("--out", default="bench/results", help="directory for the results (default bench/results; "
                                                               "an existing day's file is kept, the new one numbered)")
    parser.add_argument("--no-cuda-graph", action="store_true", help="time eager decode steps on CUDA too")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (one compilation "
                                                               "per batch size; minutes on large models)")
    parser.add_argument("--no-programmatic-launch", action="store_true",
                        help="launch the kernels without programmatic dependent launch (on by default on Hopper: "
                             "each kernel starts while the previous one drains; FP6LLM_PDL=0 turns it off too)")
    tp_argument(parser)
    parser.set_defaults(run=_bench)


def _bench(args) -> None:
    check_model_arguments(args)
    check_output_dir(args.out, "--out")
    import torch

    from ..engine.distributed import process_group
    from ..evals import throughput

    device_type = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")).type
    formats = _format_list(args.formats, args.group_size, device_type)
    batches = _int_list(args.batch or BENCH_BATCHES[device_type], "--batch")
    source = model_source(args)
    prompt_len, gen_len = bench_lengths(args.prompt_len, args.gen_len, device_type,
                                        source.config().max_position_embeddings)
    from ..kernels import launch
    pdl = launch.PDL and not args.no_programmatic_launch
    with process_group(args.tp, args.device) as (tp, device), launch.programmatic_launch(pdl):
        result = throughput.run_bench(source, formats, batches, prompt_len, gen_len, device, args.group_size,
                                      cuda_graph=not args.no_cuda_graph, compile=args.compile,
                                      progress=tp is None or tp.rank == 0, tp=tp)
        result["setup"]["programmatic_launch"] = launch.enabled(device or device_type)  # used where the GPU has it
    if tp is not None and tp.rank != 0:
        return
    print(throughput.format_table(result))
    for path in throughput.write_results(result, args.out):
        print(f"wrote {path}")


# ---- eval -----------------------------------------------------------------------------------------------------------

@command("eval", "perplexity of each format on a text file, and its argmax agreement with the reference (fp16; "
                 "a packed checkpoint's own format)")
def _eval_args(parser: argparse.ArgumentParser) -> None:
    model_arguments(parser, formats="fp16,e3m2,e2m3,e2m2,e2m1")
    parser.add_argument("--text", required=True, metavar="FILE", help="a UTF-8 text file")
    parser.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens of the text")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    parser.set_defaults(run=_eval)


def _eval(args) -> None:
    check_model_arguments(args)
    at_least("--ctx", args.ctx, 2)
    at_least("--max-tokens", args.max_tokens, 2)
    at_least("--batch-size", args.batch_size, 1)
    formats = _format_list(args.formats, args.group_size, args.device)
    text = read_text_file(args.text, "--text")
    from ..evals import perplexity

    result = perplexity.run_eval(model_source(args), formats, text, args.ctx, args.max_tokens, args.device,
                                 args.group_size, args.batch_size)
    print(perplexity.format_table(result))
