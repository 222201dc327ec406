"""Shared test setup: Triton's interpreter on CPU, this checkout's sources first, fresh random data per test.

Tests draw fresh random data on every run. The ``gen`` fixture hands out a torch.Generator seeded from a new random
seed and prints it, so a failing test shows the seed in its captured output; ``FP6LLM_TEST_SEED=<seed>`` replays it.
No test draws from torch's global generator: what initializes from it (nn.Linear, transformers' models) runs under
``helpers.seeded(gen, ...)``; ``module_gen`` serves module-scoped fixtures.
"""

import os
import random
import signal
import sys
from pathlib import Path

# A suite started in the background (`cmd &` in a script) inherits SIGINT ignored, and so would the CLI processes
# the Ctrl-C tests start: give the test process, and through it its children, Python's own handler whatever started it.
signal.signal(signal.SIGINT, signal.default_int_handler)

# Before anything imports triton: kernels run in Triton's interpreter on machines without a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Test the sources of the checkout this file is in, whichever checkout the installed fp6llm points at (CI runs in
# a fresh clone); subprocesses (the CLI) inherit the same path.
SRC = str(Path(__file__).resolve().parent.parent / "src")
sys.path.insert(0, SRC)
os.environ["PYTHONPATH"] = os.pathsep.join([SRC, *filter(None, [os.environ.get("PYTHONPATH")])])

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# Bounded example counts keep the property tests fast on 2 cores; no deadline, since a first call may compile.
settings.register_profile("fp6llm", max_examples=100, deadline=None, print_blob=True)
settings.register_profile("thorough", max_examples=2000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fp6llm"))


def pytest_make_parametrize_id(config, val, argname):
    """Readable test ids: float16, not dtype0; e3m2, not fmt0."""
    if isinstance(val, torch.dtype):
        return str(val).removeprefix("torch.")
    if type(val).__name__ == "FPFormat":
        return str(val)
    return None


def pytest_report_header(config):
    return f"fp6llm sources: {SRC}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"


def seeded_generator() -> torch.Generator:
    seed = int(os.environ.get("FP6LLM_TEST_SEED", random.SystemRandom().randrange(2**63)))
    print(f"torch generator seed {seed} (replay with FP6LLM_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fresh seed each run, printed so that a failure can be replayed."""
    return seeded_generator()


@pytest.fixture(scope="module")
def module_gen() -> torch.Generator:
    """The same for module-scoped fixtures (data built once per test file); its seed is printed in the setup
    output of the file's first test that uses it."""
    return seeded_generator()


@pytest.fixture(scope="module")
def tiny_models() -> dict:
    """tiny-llama in e3m2 and fp32, tiny-opt in e3m2 (build_random seed 0), built once per test file: each engine
    sets up its own caches."""
    from fp6llm.models import build_random

    return {(name, fmt): build_random(name, fmt, "cpu", seed=0, progress=False)
            for name, fmt in [("tiny-llama", "e3m2"), ("tiny-llama", "fp32"), ("tiny-opt", "e3m2")]}
