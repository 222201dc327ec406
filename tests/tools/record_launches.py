"""pytest plugin: record every Triton kernel launch the interpreter runs (kernel, argument types, constexprs) into
$FP6LLM_RECORD_LAUNCHES (JSON lines), so that tests/test_compile_launches.py can compile the same launches for
sm_90a: the interpreter accepts code that compiled Triton refuses."""

import json
import os

import torch

DTYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
          torch.int32: "*i32", torch.int64: "*i64", torch.int16: "*i16", torch.int8: "*i8", torch.uint8: "*u8",
          torch.bool: "*i1"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _describe(value):
    if isinstance(value, torch.Tensor):
        return DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    return None


def pytest_configure(config):
    path = os.environ.get("FP6LLM_RECORD_LAUNCHES")
    if not path:
        return
    import inspect

    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        params = list(inspect.signature(fn).parameters.values())
        signature, constexprs = {}, {}
        for param, value in zip(params, args):
            if param.annotation is tl.constexpr or "constexpr" in str(param.annotation):
                constexprs[param.name] = value
            else:
                signature[param.name] = _describe(value)
        for name, value in kwargs.items():
            if name not in LAUNCH_OPTIONS:
                constexprs[name] = value
        if None not in signature.values():
            record = {"module": fn.__module__, "name": fn.__name__, "signature": signature,
                      "constexprs": {k: v for k, v in constexprs.items() if isinstance(v, (bool, int, float))},
                      "options": {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}}
            with open(path, "a") as file:
                file.write(json.dumps(record, sort_keys=True) + "\n")
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
