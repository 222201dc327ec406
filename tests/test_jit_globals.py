"""Every @triton.jit function of the package reads only globals that compiled Triton accepts: tl.constexpr values,
other jit functions, modules (tl, triton). The interpreter accepts plain Python numbers too, so the tests on the CPU
would pass while the GPU fails to compile ("Cannot access global variable ... from within @jit'ed function")."""

import ast
import builtins
import importlib
import inspect
import pkgutil
import textwrap
import types

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import fp6llm  # noqa: E402


def jit_functions():
    for info in pkgutil.walk_packages(fp6llm.__path__, "fp6llm."):
        if info.name.endswith("__main__"):
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # optional dependencies (transformers, lm-eval, fastapi) are tested elsewhere
            continue
        for name, value in vars(module).items():
            fn = getattr(value, "fn", None)
            if isinstance(value, (triton.runtime.JITFunction, triton.runtime.interpreter.InterpretedFunction)) \
                    or (fn is not None and hasattr(value, "src")):
                yield module, name, inspect.unwrap(getattr(value, "fn", value))


def test_jit_functions_read_only_constexpr_globals():
    checked, bad = 0, []
    for module, name, fn in jit_functions():
        checked += 1
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        local = {a.arg for a in ast.walk(tree) if isinstance(a, ast.arg)}
        local |= {t.id for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign,
                                                                         ast.For))
                  for t in ast.walk(node.target if not isinstance(node, ast.Assign) else ast.Tuple(node.targets))
                  if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Name) or not isinstance(node.ctx, ast.Load) or node.id in local:
                continue
            if node.id not in vars(module):
                continue  # a builtin (range, min, ...) or the function's own name
            value = vars(module)[node.id]
            fine = (isinstance(value, (tl.constexpr, types.ModuleType, type)) or callable(value)
                    or node.id in dir(builtins))
            if not fine:
                bad.append(f"{module.__name__}.{name} reads {node.id} = {value!r}")
    assert checked >= 8  # the GEMM, attention, norm, rotary and activation kernels and their helpers
    assert not bad, "globals a compiled kernel cannot read (wrap them in tl.constexpr):\n" + "\n".join(sorted(set(bad)))
