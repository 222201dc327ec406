"""lm_head in a format of its own (WeightFormat "e3m2+head=e2m5"): what it costs a real model's perplexity, on the CPU.

    python bench/quality_lm_head.py --model /tmp/smollm2-hf --out bench/results/.../smollm2.json \
        [--heads float,e2m5,int8,e2m4,e3m2] [--bodies float,e3m2] [--windows 8 --ctx 256]

The model directory comes from ``fp6llm convert-gguf`` (docs/quality.md). Each row fake-quantizes the body's
Linears (all but lm_head) to a body method and lm_head to a head method, and scores the model against the float
one on held-out windows of real English (pydoc topics): perplexity, KL to float, argmax agreement. A tied lm_head
is untied first (the embedding keeps its float table, as fp6llm.models.loader.quantize_head does).
"""

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from fp6llm.evals import lm
from fp6llm.evals.baselines import Method


def method_or_float(name: str):
    return None if name == "float" else Method.parse(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--heads", default="float,e2m5,int8,e2m4,e3m2")
    parser.add_argument("--bodies", default="float,e3m2")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=256)
    args = parser.parse_args()
    heads = [method_or_float(h) for h in args.heads.split(",")]  # a bad name fails before the model loads
    bodies = [method_or_float(b) for b in args.bodies.split(",")]
    started = time.time()
    model, tokenizer = lm.load_causal_lm(args.model)
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    if tied:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    head_weight = model.lm_head.weight.detach().clone()
    windows = lm.text_windows(tokenizer, lm.pydoc_text(), args.ctx, args.windows)
    reference = lm.Reference(model, windows)
    rows = [reference.float_row()]
    body_quantizer = lm.FakeQuantizer(model)
    try:
        for body in bodies:
            if body is not None:
                body_quantizer.uniform(body)
            for head in heads:
                with torch.no_grad():
                    model.lm_head.weight.copy_(head_weight if head is None else head.fake_quantize(head_weight))
                label = f"body {body.name if body else 'float'} / lm_head {head.name if head else 'float'}"
                bits = 32.0 if head is None else head.bits_per_weight(head_weight.shape[1])
                row = reference.compare(model, label, bits)  # bits: lm_head's
                rows.append(row)
                change = 100 * (row.perplexity / rows[0].perplexity - 1)
                print(f"{label:34} perplexity {row.perplexity:8.3f} ({change:+.2f}%)  KL {row.kl:.4f}  argmax "
                      f"agreement {100 * row.argmax_agreement:.2f}%", flush=True)
            body_quantizer.restore()
    finally:
        body_quantizer.restore()
    setup = {"model": args.model, "tied_lm_head": tied, "lm_head_shape": list(head_weight.shape),
             "windows": args.windows, "ctx": args.ctx, "text": "pydoc_data.topics (held-out windows from the end)",
             "torch": torch.__version__, "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"),
             "seconds": round(time.time() - started, 1)}
    Path(args.out).write_text(json.dumps({"setup": setup, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
