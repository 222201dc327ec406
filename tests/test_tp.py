"""Tensor parallelism (fp6llm.models.parallel, fp6llm.engine.distributed): sharded packing is packing the slice,
per-rank loading is slicing the whole model, the split errors, and two processes over gloo against one.

Tolerance: TP=2 logits within ATOL = 1e-5 (max abs) of TP=1's, for float32 weights and for e3m2 (whose shards hold
exactly the codes and scales of the whole weight's). The ranks compute the same float32 operations with the
row-parallel sums split in two and added by the all-reduce, so they differ only by rounding (~1e-7 on logits of
size ~0.1 here); greedy tokens must be identical.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from fp6llm import fused
from fp6llm.cli import main
from fp6llm.engine import Engine, Request, SamplingParams
from fp6llm.models import ModelConfig, build_model, build_random, load_hf
from fp6llm.models.checkpoint import quantize_checkpoint, save_packed
from fp6llm.models.loader import SafetensorsCheckpoint
from fp6llm.nn import FPxLinear
from fp6llm.packing import pack
from fp6llm.quantize import quantize_weight
from fp6llm.models.parallel import (INPUT, OUTPUT, RowParallel, Split, TensorParallel, apply_tensor_parallel, plan,
                                    projections, shard_quantized)

ATOL = 1e-5
DEGREE = 2
SMALL = dict(vocab_size=256, dim=256, n_layers=2, n_heads=4, intermediate_size=256, max_position_embeddings=64)
# Shapes whose row-parallel slices are whole 128-column tiles (2 heads x 64, 128 hidden units) and whose
# column-parallel slices are whole 16-row tiles, so that a packed weight can be sliced too.
CASES = {
    "llama-gqa": ModelConfig(arch="llama", n_kv_heads=2, **SMALL),
    "llama-mqa": ModelConfig(arch="llama", n_kv_heads=1, **SMALL),  # fewer KV heads than ranks: replicated
    "qwen2-bias": ModelConfig(arch="llama", n_kv_heads=2, qkv_bias=True, **SMALL),
    "opt": ModelConfig(arch="opt", activation="relu", qkv_bias=True, o_bias=True, mlp_bias=True, position_offset=2,
                       tie_word_embeddings=True, **SMALL),
}
FORMATS = ("fp32", "e3m2")


def state(model) -> dict:
    return {name: tensor for name, tensor in model.state_dict().items()}


def assert_same_weights(model, expected) -> None:
    ours, theirs = state(model), state(expected)
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype and torch.equal(tensor, theirs[name]), name


# ---- sharded packing ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["e3m2", "e2m2", "e2m1"])  # planes 4 + 2, 4 + 1, 4
@pytest.mark.parametrize("group_size, k", [(None, 300), (64, 320)])
def test_shard_is_packing_the_slice(fmt, group_size, k, gen):
    """Row tiles (column-parallel) and whole-tile column ranges (row-parallel, the last one with K's padding) of a packed
    weight are bit-identical to quantizing and packing the same float slice."""
    n = 96
    # row scales away from FP16's subnormals: group scales are float16 only when all of a weight's fit, a choice a
    # slice could make differently from the whole (seen with FP6LLM_TEST_SEED=5360809481002585482)
    w = torch.randn(n, k, generator=gen) * (torch.rand(n, 1, generator=gen) + 0.1)
    whole = quantize_weight(w, fmt, group_size)
    for split in [Split(OUTPUT, 32, 80, 2), Split(INPUT, 0, 128, 2), Split(INPUT, 128, k, 2), Split(INPUT, 128, 256, 3)]:
        shard = shard_quantized(whole, split)
        part = w[split.weight_index]
        # per-channel scales of a column slice stay the whole row's
        absmax = w.abs().amax(dim=1) if split.dim == INPUT and group_size is None else None
        expected = quantize_weight(part, fmt, group_size, absmax)
        assert shard.shape == tuple(part.shape)
        assert all(p.is_contiguous() and torch.equal(p, q) for p, q in zip(shard.planes, expected.planes, strict=True))
        assert torch.equal(shard.scales, expected.scales)
        assert all(torch.equal(p, q) for p, q in zip(shard.planes, pack(whole.codes()[split.weight_index],
                                                                             whole.fmt)))
        assert torch.equal(shard.dequantize(), whole.dequantize()[split.weight_index])


def test_shard_of_a_packed_weight_needs_whole_words(gen):
    whole = quantize_weight(torch.randn(8, 128, generator=gen), "e3m2")
    with pytest.raises(ValueError, match="column 32 of a 128-column weight is not a multiple of 128"):
        shard_quantized(whole, Split(INPUT, 32, 128, 4))


# ---- which layers split, and the errors -----------------------------------------------------------------------------

def test_plan_splits_heads_kv_heads_and_mlp():
    model = build_model(CASES["llama-mqa"], "meta")
    splits = [plan(model, TensorParallel(rank, DEGREE)) for rank in range(DEGREE)]
    head = 64
    assert splits[1]["layers.0.self_attn.q_proj"] == Split(OUTPUT, 2 * head, 4 * head, DEGREE)
    assert splits[1]["layers.0.self_attn.o_proj"] == Split(INPUT, 2 * head, 4 * head, DEGREE)
    # one KV head for four query heads: both ranks keep it
    assert splits[0]["layers.1.self_attn.k_proj"] == splits[1]["layers.1.self_attn.k_proj"] == Split(OUTPUT, 0, head,
                                                                                                       DEGREE)
    assert splits[1]["layers.1.mlp.down_proj"] == Split(INPUT, 128, 256, DEGREE)
    assert not any("lm_head" in name or "embed" in name for name in splits[0])  # replicated
    tp_model = apply_tensor_parallel(build_model(CASES["llama-mqa"], "meta"), 1, DEGREE)
    assert (tp_model.config.n_heads, tp_model.config.n_kv_heads, tp_model.config.intermediate_size) == (2, 1, 128)
    assert tp_model.layers[0].self_attn.n_heads == 2 and tp_model.layers[0].self_attn.n_kv_heads == 1
    assert isinstance(tp_model.layers[0].mlp.down_proj, RowParallel)


@pytest.mark.parametrize("case", ["llama-gqa", "opt"])
def test_every_declared_projection_is_a_linear_or_a_fused_part(case):
    """A model class's TENSOR_PARALLEL names its layers' projections: each is a Linear of the model, or a part of
    one of its fused projections; row-parallel ones are Linears (they get an all-reduce)."""
    model = build_model(CASES[case], "meta")
    parts = {part for layout in fused.layout(model).values() for part, _, _ in layout}
    linears = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    declared = projections(model)
    for name, (dim, _) in declared.items():
        assert name in (linears if dim == INPUT else linears | parts), name
    assert parts <= declared.keys()  # no fused projection is replicated by omission


def test_a_model_that_does_not_declare_its_projections_or_is_already_split_is_refused():
    with pytest.raises(TypeError, match="Linear does not declare its tensor-parallel projections"):
        apply_tensor_parallel(torch.nn.Linear(4, 4), 0, DEGREE)
    model = apply_tensor_parallel(build_model(CASES["llama-gqa"], "meta"), 0, DEGREE)
    with pytest.raises(ValueError, match=r"the model is already tensor-parallel \(TensorParallel\(rank=0"):
        apply_tensor_parallel(model, 0, DEGREE)


@pytest.mark.parametrize("config, degree, message", [
    (dict(n_heads=4, n_kv_heads=2), 3, r"layers.0.self_attn.q_proj: 4 attention heads \(256 features\) cannot be "
                                       r"split evenly across tensor-parallel degree 3"),
    (dict(n_heads=6, n_kv_heads=3, dim=192), 2, r"layers.0.self_attn.k_proj: 3 KV heads .* degree 2"),
    (dict(n_heads=12, n_kv_heads=3, dim=384), 4, r"layers.0.self_attn.k_proj: 3 KV heads .* cannot serve "
                                                 r"tensor-parallel degree 4"),
    (dict(n_heads=4, n_kv_heads=2, intermediate_size=100), 8, r"q_proj: 4 attention heads"),
    (dict(n_heads=4, n_kv_heads=2, intermediate_size=130), 4, r"layers.0.mlp.gate_proj: intermediate_size 130 "
                                                              r"cannot be split evenly across tensor-parallel degree 4"),
])
def test_a_degree_that_does_not_divide_the_model_is_refused(config, degree, message):
    model = build_model(ModelConfig(arch="llama", **{**SMALL, **config}), "meta")
    with pytest.raises(ValueError, match=message):
        plan(model, TensorParallel(0, degree))
    with pytest.raises(ValueError, match=message.split(": ", 1)[-1]):
        build_random(model.config, "fp32", "cpu", progress=False, tp=TensorParallel(0, degree))


def test_packed_weights_split_only_at_multiples_of_128_columns(tmp_path):
    """tiny-llama's o_proj has 64 input columns: two 32-column slices. Packed planes cannot be cut there; quantizing
    the float weights per rank can (each rank packs its own slice)."""
    message = (r"layers.0.self_attn.o_proj: in_features 64 split across tensor-parallel degree 2 gives 32-column "
               r"slices, but column 32 of a 64-column weight is not a multiple of 128")
    with pytest.raises(ValueError, match=message):
        apply_tensor_parallel(build_random("tiny-llama", "e3m2", "cpu", progress=False), 0, DEGREE)
    save_packed(build_random("tiny-llama", "e3m2", "cpu", progress=False), tmp_path)
    with pytest.raises(ValueError, match=message):
        load_hf(tmp_path, device="cpu", progress=False, tp=TensorParallel(1, DEGREE))
    model = build_random("tiny-llama", "e3m2", "cpu", progress=False, tp=TensorParallel(1, DEGREE))
    assert model.layers[0].self_attn.o_proj.linear.in_features == 32
    with pytest.raises(ValueError, match=r"o_proj: in_features 64 .* 32-column slices, not whole groups of group_size "
                                         r"64"):
        build_random("tiny-llama", "e3m2", "cpu", group_size=64, progress=False, tp=TensorParallel(0, DEGREE))


def test_cli_tp_needs_torchrun_with_as_many_processes(capsys, monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert main(["generate", "--random", "tiny-llama", "--prompt", "hi", "--tp", "2"]) == 2
    assert "--tp 2 needs one process per rank, started by torchrun" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["bench", "--random", "tiny-llama", "--prompt-len", "8", "--gen-len", "4", "--tp", "4"]) == 2
    assert "--tp 4 does not match the 2 processes torchrun started" in capsys.readouterr().err
    assert main(["generate", "--random", "tiny-llama", "--prompt", "hi"]) == 2  # --tp 1 under a 2-process torchrun
    assert "--tp 1 does not match the 2 processes" in capsys.readouterr().err


# ---- each rank loads only its part ----------------------------------------------------------------------------------

def save_hf(config: ModelConfig, path, seed: int = 0) -> None:
    """transformers' model of our config with seeded random weights (biases and norms too), as safetensors."""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=config.vocab_size, hidden_size=config.dim, num_hidden_layers=config.n_layers,
                  num_attention_heads=config.n_heads, max_position_embeddings=config.max_position_embeddings)
    if config.arch == "opt":
        hf_config = transformers.OPTConfig(**common, ffn_dim=config.intermediate_size)
        model_cls = transformers.OPTForCausalLM
    elif config.qkv_bias:
        hf_config = transformers.Qwen2Config(**common, intermediate_size=config.intermediate_size,
                                             num_key_value_heads=config.n_kv_heads)
        model_cls = transformers.Qwen2ForCausalLM
    else:
        hf_config = transformers.LlamaConfig(**common, intermediate_size=config.intermediate_size,
                                             num_key_value_heads=config.n_kv_heads)
        model_cls = transformers.LlamaForCausalLM
    with torch.random.fork_rng():  # transformers initializes from the global generator: seeded here only
        torch.manual_seed(seed)
        model = model_cls(hf_config)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(path, safe_serialization=True)


@pytest.fixture(scope="module")
def bytes_read(request):
    """Bytes each SafetensorsCheckpoint read, in order (recorded when it is closed)."""
    reads = []
    original = SafetensorsCheckpoint.close

    def close(self):
        reads.append(self.bytes_read)
        original(self)

    SafetensorsCheckpoint.close = close
    yield reads
    SafetensorsCheckpoint.close = original


@pytest.mark.parametrize("case", ["llama-gqa", "qwen2-bias", "opt"])
def test_each_rank_loads_what_slicing_the_whole_model_gives(case, tmp_path, bytes_read):
    """Per-rank loading (HF safetensors quantized per rank, packed checkpoints sliced while read, random weights)
    is bit-identical to apply_tensor_parallel over the whole model, and an fp32 rank reads about its share."""
    config = CASES[case]
    save_hf(config, tmp_path / "hf")
    quantize_checkpoint(tmp_path / "hf", tmp_path / "packed", "e3m2", progress=False)
    for rank in range(DEGREE):
        tp = TensorParallel(rank, DEGREE)
        for path, fmt in [("hf", "fp32"), ("hf", "e3m2"), ("packed", None)]:
            whole = load_hf(tmp_path / path, fmt, device="cpu", progress=False)
            whole_bytes = bytes_read[-1]
            part = load_hf(tmp_path / path, fmt, device="cpu", progress=False, tp=tp)
            assert_same_weights(part, apply_tensor_parallel(whole, rank, DEGREE))
            if fmt == "fp32":  # embeddings and lm_head whole, the blocks' projections in halves
                assert bytes_read[-1] < 0.7 * whole_bytes
        for fmt in FORMATS:
            assert_same_weights(build_random(config, fmt, "cpu", seed=2, progress=False, tp=tp),
                                apply_tensor_parallel(build_random(config, fmt, "cpu", seed=2, progress=False), rank,
                                                      DEGREE))
    assert isinstance(part.layers[0].self_attn.qkv_proj, FPxLinear)


# ---- two processes over gloo ----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@torch.no_grad()
def greedy_run(model, prompts: list, steps: int) -> tuple:
    """Logits of a right-padded prefill and of ``steps`` greedy decode steps (float32 [B, T, V] each), the tokens."""
    length = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(prompt)
    model.setup_caches(len(prompts), length + steps + 1)
    last = torch.tensor([[len(p) - 1] for p in prompts])
    logits = [model(tokens, torch.arange(length).expand(len(prompts), -1), logits_at=last)]
    chosen = []
    for step in range(steps):
        chosen.append(logits[-1][:, -1].argmax(-1))
        logits.append(model(chosen[-1][:, None], last + 1 + step))
    return torch.cat(logits, dim=1), torch.stack(chosen, dim=1)


def engine_tokens(model, prompts: list, steps: int) -> list:
    """The Engine's greedy tokens (slots, batched decode)."""
    engine = Engine(model, None, max_batch_size=len(prompts), max_seq_len=48)
    requests = [Request(prompt, steps, SamplingParams()) for prompt in prompts]
    engine.add(requests)
    while engine.active:
        engine.step()
    return [r.output_ids for r in requests]


def tp_worker(rank: int, port: int, out_dir: str) -> None:
    """Rank ``rank`` of 2: each case and format as TP=1 (alone) and as TP=2 built two ways; writes its results.

    Each phase is logged to rankN.log, so that a rank that dies in C++ (no Python traceback) says where; the process
    leaves through os._exit once its results are on disk: CI once saw a rank abort ("terminate called without an
    active exception", SIGABRT) that never reproduced here, and interpreter teardown with gloo's threads is a known
    place for that."""
    import torch.distributed as dist

    log = open(os.path.join(out_dir, f"rank{rank}.log"), "a", buffering=1)
    torch.set_num_threads(1)
    log.write(f"init_process_group tcp://127.0.0.1:{port}\n")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=DEGREE)
    prompts = [list(range(5, 17)), list(range(40, 47))]
    results = {}
    try:
        for case, config in CASES.items():
            for fmt in FORMATS:
                log.write(f"{case}/{fmt}\n")
                reference, ref_tokens = greedy_run(build_random(config, fmt, "cpu", seed=1, progress=False), prompts, 6)
                models = {"per-rank": build_random(config, fmt, "cpu", seed=1, progress=False,
                                                   tp=TensorParallel(rank, DEGREE)),
                          "applied": apply_tensor_parallel(build_random(config, fmt, "cpu", seed=1, progress=False),
                                                           rank, DEGREE)}
                for how, model in models.items():
                    logits, tokens = greedy_run(model, prompts, 6)
                    results[f"{case}/{fmt}/{how}"] = dict(
                        max_diff=float((logits - reference).abs().max()), logits_size=float(reference.abs().max()),
                        same_tokens=torch.equal(tokens, ref_tokens),
                        same_engine_tokens=engine_tokens(model, prompts, 6) == ref_tokens.tolist())
        # the CLI's path with torchrun: tiny-llama quantized per rank from random weights (32-column slices)
        log.write("tiny-llama/e3m2\n")
        reference = engine_tokens(build_random("tiny-llama", "e3m2", "cpu", progress=False), prompts, 8)
        model = build_random("tiny-llama", "e3m2", "cpu", progress=False, tp=TensorParallel(rank, DEGREE))
        results["tiny-llama/e3m2/per-rank"] = dict(same_engine_tokens=engine_tokens(model, prompts, 8) == reference)
        # ... and with lm_head in a format of its own (replicated: each rank quantizes the whole head)
        log.write("tiny-llama/e3m2+head=e2m5\n")
        reference = engine_tokens(build_random("tiny-llama", "e3m2+head=e2m5", "cpu", progress=False), prompts, 8)
        model = build_random("tiny-llama", "e3m2+head=e2m5", "cpu", progress=False, tp=TensorParallel(rank, DEGREE))
        results["tiny-llama/head/per-rank"] = dict(same_engine_tokens=engine_tokens(model, prompts, 8) == reference)
    finally:
        log.write("destroy_process_group\n")
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
        json.dump(results, file)
    log.write("done\n")
    log.close()
    os._exit(0)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list:
    """Both ranks' results of tp_worker, run once for the module (torch.multiprocessing.spawn over gloo)."""
    out_dir = tmp_path_factory.mktemp("tp")
    try:
        mp.spawn(tp_worker, args=(free_port(), str(out_dir)), nprocs=DEGREE, join=True)
    except mp.ProcessExitedException as error:
        logs = {rank: (out_dir / f"rank{rank}.log") for rank in range(DEGREE)}
        where = "; ".join(f"rank {rank} last logged {path.read_text().splitlines()[-1:]}" if path.exists()
                          else f"rank {rank} logged nothing" for rank, path in logs.items())
        raise AssertionError(f"{error} ({where})") from error
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(DEGREE)]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("how", ["per-rank", "applied"])
def test_two_ranks_match_one(two_ranks, case, fmt, how):
    for rank, results in enumerate(two_ranks):
        result = results[f"{case}/{fmt}/{how}"]
        assert result["max_diff"] <= ATOL, (rank, result)
        assert result["logits_size"] > 100 * ATOL  # the logits are not all ~0
        assert result["same_tokens"] and result["same_engine_tokens"], (rank, result)


@pytest.mark.slow
def test_two_ranks_of_tiny_llama_quantized_per_rank(two_ranks):
    assert all(results["tiny-llama/e3m2/per-rank"]["same_engine_tokens"] for results in two_ranks)
    assert all(results["tiny-llama/head/per-rank"]["same_engine_tokens"] for results in two_ranks)


@pytest.mark.slow
def test_cli_generate_under_torchrun_prints_what_one_process_does():
    command = ["-m", "fp6llm", "generate", "--random", "tiny-llama", "--prompt", "hi", "--max-new-tokens", "4",
               "--device", "cpu"]
    alone = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=120)
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                               "--master-port", str(free_port()), *command, "--tp", "2"],
                              capture_output=True, text=True, timeout=120)
    assert alone.returncode == 0 and torchrun.returncode == 0, torchrun.stderr[-2000:]
    text, summary = alone.stdout.splitlines()
    lines = torchrun.stdout.splitlines()  # rank 0 only: the text and the summary once
    assert len(lines) == 2 and lines[0] == text and lines[1].startswith("prefill 3 tokens"), torchrun.stdout


def _post(port: int, fields: dict) -> dict:
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(fields).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _children(pid: int) -> list:
    """Pids of the processes whose parent is ``pid`` (from /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        children.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return children


def _environment(pid: int) -> dict:
    with open(f"/proc/{pid}/environ", "rb") as environ:
        return dict(item.split("=", 1) for item in environ.read().decode(errors="replace").split("\0") if "=" in item)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the ranks through /proc")
def test_serve_under_torchrun_answers_as_one_process_and_stops_cleanly(tmp_path):
    pytest.importorskip("fastapi")
    import threading

    import fp6llm

    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    torchrun = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                 "--master-port", str(free_port()), "-m", "fp6llm", "serve", "--random", "tiny-llama",
                                 "--device", "cpu", "--port", str(port), "--max-batch", "4", "--tp", "2"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        prompts = ["hello world", "def f(x):", "import os", "tensor parallel"]
        engine = fp6llm.load("random:tiny-llama", device="cpu", max_batch_size=4, progress=False)
        alone = engine.generate(prompts, max_new_tokens=8)
        sampled_alone = engine.generate([prompts[0]], max_new_tokens=8, temperature=0.8, seed=7)[0]
        for _ in range(240):  # up to 60 s to load and start
            try:
                _post(port, {"model": "random:tiny-llama", "prompt": "x", "max_tokens": 1})
                break
            except OSError:
                assert torchrun.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                threading.Event().wait(0.25)
        texts = [None] * len(prompts)

        def ask(i: int) -> None:  # concurrent: the ranks decode them as one batch
            texts[i] = _post(port, {"model": "random:tiny-llama", "prompt": prompts[i], "max_tokens": 8,
                                    "temperature": 0})
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert [t["choices"][0]["text"] for t in texts] == alone
        # A stop string ends a request early: rank 0 aborts it in its engine, and so must rank 1, or the next
        # requests would find the ranks' slots out of step.
        stop = next(alone[1][i:i + 2] for i in range(2, 6) if "\ufffd" not in alone[1][i:i + 2])
        stopped = _post(port, {"model": "random:tiny-llama", "prompt": prompts[1], "max_tokens": 8, "temperature": 0,
                               "stop": [stop]})
        assert stopped["choices"][0]["finish_reason"] == "stop"
        assert stopped["choices"][0]["text"] == alone[1][:alone[1].index(stop)]
        again = _post(port, {"model": "random:tiny-llama", "prompt": prompts[2], "max_tokens": 8, "temperature": 0})
        assert again["choices"][0]["text"] == alone[2]
        sampled = _post(port, {"model": "random:tiny-llama", "prompt": prompts[0], "max_tokens": 8,
                               "temperature": 0.8, "seed": 7})
        assert sampled["choices"][0]["text"] == sampled_alone
        workers = _children(torchrun.pid)
        rank0 = [pid for pid in workers if _environment(pid).get("RANK") == "0"]
        assert len(workers) == 2 and len(rank0) == 1, workers
        os.kill(rank0[0], signal.SIGTERM)  # rank 0 shuts down, releases rank 1, and both leave together
        assert torchrun.wait(60) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        if torchrun.poll() is None:
            torchrun.kill()
            torchrun.wait()
