"""Every Triton kernel launch that the interpreter tests make also compiles for sm_90a (on the CPU: triton.compile
for GPUTarget("cuda", 90, 32)). The interpreter runs code that compiled Triton refuses (a plain Python global in a
kernel, seen twice on the H200 on 2026-12-01); this replays the launches of the kernel test files, recorded by
tests/tools/record_launches.py, through the compiler."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parent
# The interpreter tests of each kernel family, narrowed to cases that cover their configurations quickly.
KERNEL_TESTS = ["test_attention.py", "test_decoder_ops.py", "test_kernels.py::test_every_format_and_dtype",
                "test_kernels.py::test_every_path_odd_shapes", "test_kernels.py::test_group_scales",
                "test_kernels.py::test_dequantize_first_path"]
COMPILE = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
failures, done = [], 0
for line in sorted(set(open(sys.argv[1]))):
    launch = json.loads(line)
    fn = getattr(importlib.import_module(launch["module"]), launch["name"])
    signature = dict(launch["signature"])
    signature.update({name: "constexpr" for name in launch["constexprs"]})
    pointers = [(i,) for i, (name, kind) in enumerate(signature.items()) if kind.startswith("*")]
    source = ASTSource(fn, signature, constexprs=launch["constexprs"],
                       attrs={p: [["tt.divisibility", 16]] for p in pointers})
    try:
        triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch["options"])
        done += 1
    except Exception as err:
        failures.append(f"{launch['module']}.{launch['name']} {launch['constexprs']}: {str(err)[:400]}")
print(done)
print("\\n".join(failures))
sys.exit(1 if failures else 0)
"""


@pytest.mark.slow
def test_every_interpreted_launch_compiles_for_sm90a(tmp_path):
    record = tmp_path / "launches.jsonl"
    env = {**os.environ, "TRITON_INTERPRET": "1", "FP6LLM_RECORD_LAUNCHES": str(record),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tools"), os.environ.get("PYTHONPATH", "")])}
    tests = [str(ROOT / t) for t in KERNEL_TESTS]
    ran = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "record_launches", "-p", "no:cacheprovider",
                          *tests], env=env, capture_output=True, text=True, timeout=1200, cwd=ROOT.parent)
    assert ran.returncode == 0, ran.stdout[-3000:]
    kernels = {json.loads(line)["name"] for line in record.read_text().splitlines()}
    assert {"fpx_gemm_kernel", "dequantize_kernel"} <= kernels and len(kernels) >= 6, kernels
    env["TRITON_INTERPRET"] = "0"
    compiled = subprocess.run([sys.executable, "-c", COMPILE, str(record)], env=env, capture_output=True, text=True,
                              timeout=1200)
    assert compiled.returncode == 0, (compiled.stdout + compiled.stderr)[-4000:]
