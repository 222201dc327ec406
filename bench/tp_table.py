"""One tensor-parallel table from `fp6llm bench` results (issue 9): tokens/s per GPU, and the goals' ratios.

    python bench/tp_table.py RESULT.json [RESULT.json ...] [--out bench/results] [--note "..."]

Each RESULT.json is what `fp6llm bench --out DIR` wrote (one run per format and degree, as bench/run_tp.sh makes
them); its setup says the degree (tensor_parallel). Rows are keyed by (format, degree, batch); the table gives decode
tokens/s in all and per GPU, ms per step and the bandwidth-floor fraction (per GPU: that GPU's bytes over its copy
bandwidth), and, where the runs are there, the two ratios the issue asks for:

- FP6 on one GPU over FP16 on two, in decode tokens/s per GPU, per batch;
- FP16 TP=2 over FP6 TP=2 in ms per step (the speed-up of a decode step at the same degree), per batch.

Writes tp-<device>-<date>.{md,json} in --out and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

FP16 = ("fp16", "bf16")


def load_rows(paths: list) -> tuple:
    """(rows [{format, tp, batch, ...}], setups) of the result files, in the order given."""
    rows, setups = [], []
    for path in paths:
        result = json.loads(Path(path).read_text())
        setup = result["setup"]
        degree = int(setup.get("tensor_parallel", 1))
        setups.append({**setup, "file": str(path)})
        for row in result["rows"]:
            if row.get("batch", 0) > 0 and not row.get("note"):
                rows.append({**row, "tp": degree, "gpus": degree,
                             "decode_tokens_per_s_per_gpu": row["decode_tokens_per_s"] / degree})
    return rows, setups


def ratios(rows: list) -> list:
    """[{batch, fp6_tp1_per_gpu_over_fp16_tp2, fp16_tp2_ms_over_fp6_tp2}] for the batches the runs share."""
    by_key = {(r["format"] in FP16, r["tp"], r["batch"]): r for r in rows}
    out = []
    for batch in sorted({r["batch"] for r in rows}):
        fp16_tp2, fp6_tp1, fp6_tp2 = (by_key.get(key) for key in ((True, 2, batch), (False, 1, batch),
                                                                   (False, 2, batch)))
        entry = {"batch": batch}
        if fp16_tp2 and fp6_tp1:
            entry["fp6_tp1_per_gpu_over_fp16_tp2"] = (fp6_tp1["decode_tokens_per_s_per_gpu"]
                                                      / fp16_tp2["decode_tokens_per_s_per_gpu"])
        if fp16_tp2 and fp6_tp2:
            entry["fp16_tp2_ms_over_fp6_tp2"] = fp16_tp2["ms_per_step"] / fp6_tp2["ms_per_step"]
        if len(entry) > 1:
            out.append(entry)
    return out


def markdown(rows: list, setups: list, note: str = "") -> str:
    first = setups[0]
    lines = [f"# Tensor-parallel decode: {first['model']} on {first['device']}, {first['date']}", "",
             f"prompt {first['prompt_len']} tokens, {first['gen_len']} new tokens per row (greedy), decode steps "
             f"{'as CUDA graphs' if first.get('cuda_graph') else 'eager'}; torch {first['torch']}. floor = (the GPU's "
             f"weights + KV read per step) / its measured copy bandwidth / ms per step (all-reduces not counted).", ""]
    if note:
        lines += [note, ""]
    lines += ["| weights | GPUs (TP) | batch | decode tok/s | tok/s per GPU | ms/step | weight GB per GPU | floor |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['format']} | {r['tp']} | {r['batch']} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['decode_tokens_per_s_per_gpu']:.1f} | {r['ms_per_step']:.2f} | {r['weight_gb']:.1f} | "
                     f"{r['floor_fraction']:.2f} |")
    table = ratios(rows)
    if table:
        lines += ["", "| batch | FP6 TP=1 / FP16 TP=2, tok/s per GPU (goal >= 1.7) | FP16 TP=2 / FP6 TP=2, ms per step "
                      "(goal >= 1.6 at batch 1) |", "|---:|---:|---:|"]
        for entry in table:
            cells = [f"{entry[key]:.2f}x" if key in entry else "-"
                     for key in ("fp6_tp1_per_gpu_over_fp16_tp2", "fp16_tp2_ms_over_fp6_tp2")]
            lines.append(f"| {entry['batch']} | {cells[0]} | {cells[1]} |")
    lines += ["", "Runs: " + "; ".join(f"{Path(s['file']).parent.name} (TP={s.get('tensor_parallel', 1)}, copy "
                                       f"{s['copy_bandwidth_gb_s']:.0f} GB/s)" for s in setups)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--note", default="", help="a paragraph for the table's head")
    args = parser.parse_args()
    rows, setups = load_rows(args.results)
    if not rows:
        raise SystemExit("tp_table.py: no measured rows in the files given")
    text = markdown(rows, setups, args.note)
    device = re.sub("[^a-z0-9]+", "-", setups[0]["device"].lower()).strip("-")
    stem = args.out / f"tp-{device}-{setups[0]['date']}"
    args.out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({"runs": setups, "rows": rows, "ratios": ratios(rows)},
                                                    indent=1) + "\n")
    print(text)
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
