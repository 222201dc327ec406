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
SOURCE
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


SPLITS_HARNESS = r"""
#include <cstdio>
#define __device__
#define __forceinline__ inline
static float __ldcg(const float* p) { return *p; }
SOURCE
template <int E>
static void run(const float* ws, int slab, int splits, float* out) {  // outputs e < E, e % 3 != 2 valid
    sum_splits<E>(ws, slab, splits, [&](int e) { return (long)e * 2 + 1; }, [&](int e) { return e % 3 != 2; },
                  [&](int e, float v) { out[e] = v; });
}
int main() {
    int splits;
    if (std::fread(&splits, 4, 1, stdin) != 1) return 2;
    const int slab = 300;  // floats between splits; output e at 2 e + 1 of each
    static float ws[300 * 64], out[128 + 64];
    if (std::fread(ws, 4, (size_t)slab * splits, stdin) != (size_t)slab * splits) return 2;
    for (int e = 0; e < 128 + 64; ++e) out[e] = -1.f;
    run<128>(ws, slab, splits, out);  // chunks of 8
    run<40>(ws, slab, splits, out + 128);  // chunks of 16, the last one partial
    std::fwrite(out, 4, 128 + 64, stdout);
    return 0;
}
"""


def _function(name: str, kind: str = "float") -> str:
    source = COMMON.read_text()
    start = source.index(f"__device__ __forceinline__ {kind} {name}(")
    start = source.rindex("\n", 0, source.rindex("\n", 0, start)) + 1 if kind == "void" else start
    end = source.index("\n}\n", start) + 3
    return re.sub(r"#pragma unroll\n", "", source[start:end])


def _compile(tmp_path, name: str, text: str) -> Path:
    source = tmp_path / f"{name}.cpp"
    source.write_text(text)
    binary = tmp_path / name
    subprocess.run([CXX, "-std=c++17", "-O2", "-ffp-contract=off", "-o", str(binary), str(source)], check=True)
    return binary


def _values(gen, *shape) -> torch.Tensor:
    """float32 values of mixed signs and magnitudes (2^-20 .. 2^20), 5 % negative zeros: sums depend on their order."""
    values = torch.randn(*shape, generator=gen) * 2.0 ** torch.randint(-20, 20, shape, generator=gen)
    values[torch.rand(*shape, generator=gen) < 0.05] = -0.0
    return values


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
def test_sum_partials_adds_the_splits_in_order(tmp_path):
    """sum_partials (the small-M kernel's split-K sum) equals float32 additions in split order, bit for bit, for
    every split 1..40 (eight loads at a time, predicated), on values of mixed signs and magnitudes with negative
    zeros among them: the sums must not depend on how the loads are grouped."""
    binary = _compile(tmp_path, "sum_partials", HARNESS.replace("SOURCE", _function("sum_partials")))
    gen = torch.Generator().manual_seed(0)
    rows = 64
    for splits in range(1, 41):
        parts = _values(gen, splits, rows)
        run = subprocess.run([str(binary)], input=torch.tensor([rows, splits], dtype=torch.int32).numpy().tobytes()
                             + parts.numpy().tobytes(), capture_output=True, check=True)
        got = torch.frombuffer(bytearray(run.stdout), dtype=torch.float32)
        want = torch.zeros(rows)
        for s in range(splits):
            want = want + parts[s]
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), splits


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
def test_sum_splits_adds_the_splits_in_order_and_stores_only_valid_outputs(tmp_path):
    """sum_splits (the wgmma and mid-M kernels' split-K sum, in chunks of 8 or 16 outputs) hands store(e, sum) the
    float32 additions of output e's partials in split order, bit for bit, for E = 128 and 40 (a partial last chunk)
    and splits 1..12, and leaves the outputs valid() refuses untouched."""
    binary = _compile(tmp_path, "sum_splits", SPLITS_HARNESS.replace("SOURCE", _function("sum_splits", "void")))
    gen = torch.Generator().manual_seed(1)
    for splits in range(1, 13):
        ws = _values(gen, splits, 300)
        run = subprocess.run([str(binary)], input=torch.tensor([splits], dtype=torch.int32).numpy().tobytes()
                             + ws.numpy().tobytes(), capture_output=True, check=True)
        got = torch.frombuffer(bytearray(run.stdout), dtype=torch.float32)
        for base, count in ((0, 128), (128, 40)):
            want = torch.zeros(count)
            for s in range(splits):
                want = want + ws[s, 1:2 * count:2]
            valid = torch.arange(count) % 3 != 2
            assert torch.equal(got[base:base + count][valid].view(torch.int32), want[valid].view(torch.int32)), splits
            assert (got[base:base + count][~valid] == -1).all(), splits
