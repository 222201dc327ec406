"""Paged decode attention (kernels/attention.py) on the GPU at hand, per split-KV factor and keys per loop step: llama-2-13b's
heads (40 query and KV heads of 128), rows of one context length, against the bytes of K and V it must read.

    python bench/attention_decode.py [--batches 1,8,32,64] [--contexts 160,1024] [--splits 1,2,4,8,16]
                                     [--keys 16,64]
                                     [--table-blocks N] [--out FILE.json]

Each case is checked against the split 1 result (same output within 1e-2) and timed as a CUDA graph of repeated
calls (fp6llm/evals/timing.py). The table is as wide as --table-blocks (default: the context's blocks), as an engine's
block table is as wide as its max_seq_len.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from fp6llm.evals.timing import time_calls  # noqa: E402
from fp6llm.kernels import attention  # noqa: E402


def case(batch: int, context: int, heads: int, head_dim: int, table_blocks: int, block: int = 16):
    blocks = -(-context // block)
    pool = batch * blocks + 1
    k_cache = torch.randn(pool, block, heads, head_dim, device="cuda", dtype=torch.float16)
    v_cache = torch.randn_like(k_cache)
    tables = torch.zeros(batch, max(table_blocks, blocks), dtype=torch.int32, device="cuda")
    tables[:, :blocks] = 1 + torch.randperm(batch * blocks, device="cuda").view(batch, blocks).to(torch.int32)
    q = torch.randn(batch, heads, 1, head_dim, device="cuda", dtype=torch.float16)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    pos = torch.full((batch, 1), context - 1, dtype=torch.long, device="cuda")
    return q, k_cache, v_cache, tables, seq_lens, pos


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--contexts", default="160,1024")
    parser.add_argument("--splits", default="1,2,4,8,16")
    parser.add_argument("--keys", default="16,64", help="keys per loop step (multiples of the cache block)")
    parser.add_argument("--table-blocks", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            q, k_cache, v_cache, tables, seq_lens, pos = case(batch, context, 40, 128, args.table_blocks)
            nbytes = 2 * batch * context * 40 * 128 * 2
            _, default = attention.decode_launch(tables.shape[1], k_cache.shape[1], batch * 40)
            base = attention.paged_decode(q, k_cache, v_cache, tables, seq_lens, pos, None, splits=1, keys=16)
            for keys in (int(k) for k in args.keys.split(",")):
                line = []
                for splits in sorted({int(s) for s in args.splits.split(",")} | {default}):
                    out = attention.paged_decode(q, k_cache, v_cache, tables, seq_lens, pos, None, splits=splits,
                                                 keys=keys)
                    same = bool(torch.allclose(out, base, atol=1e-2, rtol=1e-2))
                    t = time_calls([lambda s=splits, n=keys: attention.paged_decode(
                        q, k_cache, v_cache, tables, seq_lens, pos, None, splits=s, keys=n)]) * 1e6
                    rows.append({"batch": batch, "context": context, "keys": keys, "splits": splits, "us": t,
                                 "default": default, "gbs": nbytes / t / 1e3, "same": same})
                    line.append(f"{splits}{'*' if splits == default else ''}: {t:6.1f} us "
                                f"({nbytes / t / 1e3:5.0f} GB/s){'' if same else ' DIFFERS'}")
                print(f"context {context:5} batch {batch:3} keys {keys:3}  " + "  ".join(line), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(0),
                                              "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
