"""Pieces of the CUDA kernels' shared header (src/fp6llm/kernels/cuda/fpx_common.cuh) that are plain arithmetic,
compiled for the host with the machine's C++ compiler and checked against a PyTorch reference: what the GPU tests
check only where a GPU is lent."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

COMMON = Path(__file__).resolve().parent.parent / "src" / "fp6llm" / "kernels" / "cuda" / "fpx_common.cuh"
CXX = shutil.which("g++") or shutil.which("clang++")

HARNESS = r"""
#include <cstdio>
#define __device__
#define __forceinline__ inline
static float __ldcg(const float* p) { return *p; }
%s
int main() {
    int rows, splits;
    if (std::fread(&rows, 4, 1, stdin) != 1 || std::fread(&splits, 4, 1, stdin) != 1) return 2;
    static float p[1 << 16];
    if (std::fread(p, 4, (size_t)rows * splits, stdin) != (size_t)rows * splits) return 2;
    for (int r = 0; r < rows; ++r) {  // row r's partials at p[r], p[r + rows], ... (the kernels' slab stride)
        const float v = sum_partials(p + r, rows, splits);
        std::fwrite(&v, 4, 1, stdout);
    }
    return 0;
}
"""


def _function(name: str) -> str:
    source = COMMON.read_text()
    start = source.index(f"__device__ __forceinline__ float {name}(")
    end = source.index("\n}\n", start) + 3
    return re.sub(r"#pragma unroll\n", "", source[start:end])


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
def test_sum_partials_adds_the_splits_in_order(tmp_path):
    """sum_partials (the small-M kernel's split-K sum) equals float32 additions in split order, bit for bit, for
    every split 1..40 (eight loads at a time, predicated; splits that are not multiples of 8 included), on values of
    mixed signs and magnitudes with negative zeros among them: the sums must not depend on how the loads are grouped."""
    source = tmp_path / "sum_partials.cpp"
    source.write_text(HARNESS % _function("sum_partials"))
    binary = tmp_path / "sum_partials"
    subprocess.run([CXX, "-O2", "-ffp-contract=off", "-o", str(binary), str(source)], check=True)
    gen = torch.Generator().manual_seed(0)
    rows = 64
    for splits in range(1, 41):
        parts = torch.randn(splits, rows, generator=gen) * 2.0 ** torch.randint(-20, 20, (splits, rows), generator=gen)
        parts[torch.rand(splits, rows, generator=gen) < 0.05] = -0.0
        run = subprocess.run([str(binary)], input=torch.tensor([rows, splits], dtype=torch.int32).numpy().tobytes()
                             + parts.numpy().tobytes(), capture_output=True, check=True)
        got = torch.frombuffer(bytearray(run.stdout), dtype=torch.float32)
        want = torch.zeros(rows)
        for s in range(splits):
            want = want + parts[s]
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), splits
