"""Attention over the paged KV cache: the PyTorch reference against dense attention, the Triton decode and
prefill kernels against the reference (Triton's interpreter on a CPU), and attention work that follows the valid
tokens, not the capacity.

Random block tables (each row's blocks scattered over the pool), lengths 1..N, GQA ratios 1 / 4 / 8, sliding
windows, fp16 and bf16. Tolerance: relative Frobenius error against a float64 reference below TOL; the output
buffers of the kernels are fresh (torch.empty) and the cache blocks nobody owns are filled with NaN, so a read of
one shows.
"""

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

from fp6llm.engine import Engine, Request
from fp6llm.models import ModelConfig, attention, build_random
from fp6llm.models.attention import paged_attention_reference

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
runs_kernel = pytest.mark.skipif(not CUDA and not INTERPRETED, reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if CUDA else "cpu"
BLOCK = 16
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5, torch.float64: 1e-12}


def relative_error(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def paged_case(gen, lengths, n_kv, groups, head_dim=16, dtype=torch.float16, new_tokens=None):
    """Random K/V of rows of ``lengths`` positions in a pool of scattered blocks (the others NaN), queries for the
    last ``new_tokens`` positions of each row (1: decode) and the dense K/V [B, Hkv, S, D] they stand for."""
    b = len(lengths)
    per_row = [-(-n // BLOCK) for n in lengths]
    width = max(per_row)
    pool = sum(per_row) + 3
    order = torch.randperm(pool - 1, generator=gen)[:sum(per_row)] + 1  # block 0 stays unowned
    tables = torch.zeros(b, width, dtype=torch.int32)
    k_cache = torch.full((pool, BLOCK, n_kv, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    dense_k, dense_v = [], []
    used = 0
    for row, n in enumerate(lengths):
        blocks = order[used:used + per_row[row]]
        used += per_row[row]
        tables[row, :len(blocks)] = blocks.to(torch.int32)
        k = torch.randn(n, n_kv, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, n_kv, head_dim, generator=gen).to(dtype)
        slots = blocks.repeat_interleave(BLOCK)[:n] * BLOCK + torch.arange(n) % BLOCK
        k_cache.view(-1, n_kv, head_dim)[slots] = k
        v_cache.view(-1, n_kv, head_dim)[slots] = v
        dense_k.append(k)
        dense_v.append(v)
    t = new_tokens or 1
    q = torch.randn(b, n_kv * groups, t, head_dim, generator=gen).to(dtype)
    input_pos = torch.stack([torch.arange(n - t, n).clamp(min=0) for n in lengths])
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    return q, k_cache, v_cache, tables, seq_lens, input_pos, dense_k, dense_v


def dense_attention(q, dense_k, dense_v, input_pos, window=None):
    """float64 attention of each row on its own: query head h reads KV head h // groups."""
    out = []
    for row, (k, v) in enumerate(zip(dense_k, dense_v)):
        groups = q.shape[1] // k.shape[1]
        k = k.double().transpose(0, 1).repeat_interleave(groups, 0)  # [H, S, D]
        v = v.double().transpose(0, 1).repeat_interleave(groups, 0)
        key_pos = torch.arange(k.shape[1])
        query_pos = input_pos[row][:, None]
        mask = key_pos <= query_pos
        if window is not None:
            mask = mask & (key_pos > query_pos - window)
        out.append(F.scaled_dot_product_attention(q[row].double(), k, v, attn_mask=mask))
    return torch.stack(out)


def nan_free(*tensors):
    return [torch.nan_to_num(t, nan=0.0) for t in tensors]


@pytest.mark.parametrize("groups", [1, 4, 8])
@pytest.mark.parametrize("window", [None, 5])
def test_reference_equals_dense_attention(gen, groups, window):
    lengths = torch.randint(1, 60, (3,), generator=gen).tolist()
    q, k_cache, v_cache, tables, seq_lens, pos, dk, dv = paged_case(gen, lengths, 2, groups, dtype=torch.float64,
                                                                    new_tokens=4)
    k_cache, v_cache = nan_free(k_cache, v_cache)  # the reference gathers whole blocks (masked, but 0 * NaN)
    out = paged_attention_reference(q, k_cache, v_cache, tables, seq_lens, pos, window)
    assert relative_error(out, dense_attention(q, dk, dv, pos, window)) < TOL[torch.float64]


@runs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("groups, window, head_dim", [(1, None, 16), (4, None, 16), (8, None, 16), (4, 20, 16),
                                                      (5, None, 24)])  # the last: padded head and group tiles
def test_decode_kernel_matches_the_reference(gen, dtype, groups, window, head_dim):
    from fp6llm.kernels.attention import paged_decode

    lengths = [1] + torch.randint(2, 90, (2,), generator=gen).tolist()
    q, k_cache, v_cache, tables, seq_lens, pos, dk, dv = paged_case(gen, lengths, 2, groups, head_dim, dtype)
    expected = dense_attention(q, dk, dv, pos, window)
    to = dict(device=DEVICE)
    # one program per row and KV head (it stores the output); split-KV with the combine kernel, 16 splits leaving
    # most programs of a short row without keys; one cache block or several per loop step
    for splits, keys in ((1, 16), (3, 16), (1, 64), (3, 64), (4, 32), (16, 64)):
        out = paged_decode(q.to(**to), k_cache.to(**to), v_cache.to(**to), tables.to(**to), seq_lens.to(**to),
                           pos.to(**to), window, splits=splits, keys=keys)
        assert out.dtype == dtype and out.shape == q.shape
        assert relative_error(out.cpu(), expected) < TOL[dtype], (splits, keys)
    with pytest.raises(ValueError, match="multiple of the cache block"):
        paged_decode(q.to(**to), k_cache.to(**to), v_cache.to(**to), tables.to(**to), seq_lens.to(**to),
                     pos.to(**to), window, keys=24)


@runs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("groups, window, head_dim", [(1, None, 16), (8, None, 16), (4, 7, 16), (5, None, 24)])
def test_prefill_kernel_matches_the_reference(gen, dtype, groups, window, head_dim):
    """A chunk of 20 new tokens after cached prefixes of 0 .. 40 positions (prefill and extend)."""
    from fp6llm.kernels.attention import paged_prefill

    lengths = [20] + (20 + torch.randint(1, 40, (1,), generator=gen)).tolist()
    q, k_cache, v_cache, tables, seq_lens, pos, dk, dv = paged_case(gen, lengths, 2, groups, head_dim, dtype,
                                                                    new_tokens=20)
    to = dict(device=DEVICE)
    out = paged_prefill(q.to(**to), k_cache.to(**to), v_cache.to(**to), tables.to(**to), seq_lens.to(**to),
                        pos.to(**to), window)
    assert out.dtype == dtype and out.shape == q.shape
    assert relative_error(out.cpu(), dense_attention(q, dk, dv, pos, window)) < TOL[dtype]


@runs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_kernels_write_heads_in_the_wgmma_order(gen, dtype):
    """With order=True the decode kernel (one split, and split-KV through the combine kernel) and the prefill kernel
    store each head's 128 values in the wgmma kernel's k order: wgmma_x_order_reference of the plain output, bit
    for bit; so does paged_attention on the op's path; a head size not a multiple of 128 is refused."""
    from fp6llm.kernels.attention import paged_decode, paged_prefill
    from fp6llm.kernels.wgmma_order import wgmma_x_order_reference
    from fp6llm.models.attention import paged_attention
    to = dict(device=DEVICE)
    case = [t.to(**to) for t in paged_case(gen, [5, 40], 1, 2, 128, dtype)[:6]]
    for splits in (1, 3):
        plain = paged_decode(*case, splits=splits, keys=16)
        assert torch.equal(paged_decode(*case, splits=splits, keys=16, order=True), wgmma_x_order_reference(plain))
    chunk = [t.to(**to) for t in paged_case(gen, [20, 33], 1, 2, 128, dtype, new_tokens=20)[:6]]
    assert torch.equal(paged_prefill(*chunk, order=True), wgmma_x_order_reference(paged_prefill(*chunk)))
    cpu = [t.cpu().nan_to_num() for t in case]  # the reference gathers the unowned (NaN) blocks too
    assert torch.equal(paged_attention(*cpu, order=True), wgmma_x_order_reference(paged_attention(*cpu)))
    small = [t.to(**to) for t in paged_case(gen, [5], 1, 2, 64, dtype)[:6]]
    with pytest.raises(ValueError, match="multiple of 128"):
        paged_decode(*small, order=True)
    with pytest.raises(ValueError, match="multiple of 128"):
        paged_attention(*[t.cpu() for t in small], order=True)


def test_attention_work_follows_the_valid_tokens(monkeypatch, gen):
    """One sequence in a cache of 2048 positions: a decode step at length 10 gathers 1 block of K/V per layer, at
    length 2000 125 blocks (the static cache read all 2048 positions in both). Counted at the attention call: the
    bytes of the block-table columns it is given (the reference gathers them all, the kernels read only the valid
    ones of each row)."""
    config = dataclasses.replace(ModelConfig.from_name("tiny-llama"), max_position_embeddings=2048)
    model = build_random(config, "fp32", "cpu", seed=0, progress=False)
    engine = Engine(model, None, max_batch_size=1, max_seq_len=2048)
    read = []
    original = attention.paged_attention

    def counting(q, k_cache, v_cache, block_tables, *args):
        if q.shape[2] == 1:  # decode steps
            read.append(2 * block_tables.numel() * k_cache[0].numel() * k_cache.element_size())
        return original(q, k_cache, v_cache, block_tables, *args)

    monkeypatch.setattr(attention, "paged_attention", counting)
    layers, per_block = model.config.n_layers, 2 * BLOCK * model.config.n_kv_heads * model.config.head_dim * 4
    for length, blocks in ((10, 1), (2000, 125)):
        read.clear()
        request = Request(torch.randint(3, 500, (length - 1,), generator=gen).tolist(), 2)
        engine.add([request])
        engine.step()  # prefill, first token
        engine.step()  # one decode step at length `length`
        assert request.finished and sum(read) == layers * blocks * per_block


def recorded_logits(engine, prompts, max_new_tokens):
    """Greedy output ids of the prompts and the logits each step sampled from, per request (read where the engine
    accepts a step's drawn tokens, before the next step can overwrite a captured graph's logits)."""
    logits, accept = {}, engine._accept

    def recording(drawn):
        for requests, _, rows in drawn:
            for request, row in zip(requests, rows):
                logits.setdefault(request, []).append(row.float().cpu())
        return accept(drawn)

    engine._accept = recording
    requests = [Request(p, max_new_tokens) for p in prompts]
    engine.add(requests)
    while engine.active:
        engine.step()
    return [r.output_ids for r in requests], [torch.stack(logits[r]) for r in requests]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_engine_kernels_and_graphs_match_the_reference(monkeypatch, gen):
    """On CUDA: the decode step captured as CUDA graphs (static block tables / lengths / slot mapping, padded
    batch sizes) and run eagerly, both through the Triton kernels, against the PyTorch reference attention; the
    logits of the first two steps of each prompt within 1e-2 (fp16), teacher-forced by comparing only while the
    tokens agree."""
    model = build_random("tiny-llama", "fp16", "cuda", seed=0, progress=False)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (5, 40, 17)]
    results = {}
    for name, graph in (("graph", True), ("eager", False)):
        engine = Engine(model, None, max_batch_size=4, max_seq_len=128, cuda_graph=graph)
        engine.warm_up()
        results[name] = recorded_logits(engine, prompts, 6)
        engine.close()
    monkeypatch.setattr(attention, "paged_attention", paged_attention_reference)
    engine = Engine(model, None, max_batch_size=4, max_seq_len=128, cuda_graph=False)
    reference = recorded_logits(engine, prompts, 6)
    for name, (tokens, logits) in results.items():
        for row in range(len(prompts)):
            agree = next((i for i, (a, b) in enumerate(zip(tokens[row], reference[0][row])) if a != b), 6)
            steps = max(1, min(agree + 1, 2))
            assert relative_error(logits[row][:steps], reference[1][row][:steps].double()) < 1e-2, (name, row)


@runs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cache_write_kernel_stores_each_token_in_its_slot(gen, dtype):
    """k and v as the fused qkv projection leaves them (strided views) into distinct random slots: exactly what
    the reference stores; every other slot keeps its NaN."""
    from fp6llm.kernels.attention import write_kv_kernel
    from fp6llm.models.attention import write_kv_reference

    b, t, n_kv, d, pool = 2, 5, 3, 24, 6
    qkv = torch.randn(b, t, 4 + 2 * n_kv, d, generator=gen).to(dtype)
    k, v = qkv[:, :, 4:4 + n_kv], qkv[:, :, 4 + n_kv:]
    slots = torch.randperm(pool * BLOCK, generator=gen)[:b * t].view(b, t).to(torch.int32)
    expected = [torch.full((pool, BLOCK, n_kv, d), float("nan"), dtype=dtype) for _ in range(2)]
    write_kv_reference(*expected, slots, k, v)
    caches = [torch.full_like(expected[0], float("nan"), device=DEVICE) for _ in range(2)]
    write_kv_kernel(*caches, slots.to(DEVICE), k.to(DEVICE), v.to(DEVICE))
    for cache, reference in zip(caches, expected):
        assert torch.equal(cache.cpu().nan_to_num(7.0), reference.nan_to_num(7.0))


@runs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_q, n_kv", [(4, 4), (6, 2), (5, 1)])  # MHA, GQA, heads that straddle a program's 4
def test_rotary_and_cache_write_kernel_equals_rotary_then_write(gen, dtype, n_q, n_kv):
    """The fused kernel (q and k rotated, k and v into their slots, one launch) gives, bit for bit, what the
    rotary op and the cache write give one after the other: the q it returns and every slot of both caches (the
    untouched ones keep their NaN); a padded head dimension (D = 24); the Attention module's argument checks."""
    from fp6llm.decoder_ops import rotary_reference
    from fp6llm.kernels.attention import write_kv_kernel
    from fp6llm.kernels.rotary import rotary, rotary_write_kv
    from fp6llm.models.attention import PagedKVCache, write_kv_reference

    b, t, d, pool = 2, 5, 24, 6
    qkv = torch.randn(b, t, n_q + 2 * n_kv, d, generator=gen).to(dtype)
    positions = torch.randint(0, 40, (b, t), generator=gen)
    angles = torch.outer(torch.arange(40, dtype=torch.float32), torch.rand(d // 2, generator=gen))
    cos, sin = angles.cos(), angles.sin()
    slots = torch.randperm(pool * BLOCK, generator=gen)[:b * t].view(b, t).to(torch.int32)
    on = [x.to(DEVICE) for x in (qkv, positions, cos, sin, slots)]
    # the two kernels one after the other
    rotated = rotary(on[0][:, :, :n_q + n_kv], *on[1:4])
    expected = [torch.full((pool, BLOCK, n_kv, d), float("nan"), dtype=dtype, device=DEVICE) for _ in range(2)]
    write_kv_kernel(*expected, on[4], rotated[:, :, n_q:], on[0][:, :, n_q + n_kv:])
    caches = [torch.full_like(expected[0], float("nan")) for _ in range(2)]
    q = rotary_write_kv(*on[:4], *caches, on[4], n_q)
    assert torch.equal(q, rotated[:, :, :n_q])
    for cache, reference in zip(caches, expected):
        assert torch.equal(cache.nan_to_num(7.0), reference.nan_to_num(7.0))
    # the module's op on the CPU: its reference, rotary then write
    cache = PagedKVCache(pool, BLOCK, n_kv, d, dtype)
    q = cache.rotate_and_write(slots, qkv, n_q, positions, cos, sin)
    rotated = rotary_reference(qkv[:, :, :n_q + n_kv], positions, cos, sin)
    caches = [torch.zeros_like(cache.k_cache) for _ in range(2)]
    write_kv_reference(*caches, slots, rotated[:, :, n_q:], qkv[:, :, n_q + n_kv:])
    assert torch.equal(q, rotated[:, :, :n_q]) and torch.equal(cache.k_cache, caches[0]) \
        and torch.equal(cache.v_cache, caches[1])
    with pytest.raises(ValueError, match=r"qkv must be \[B, T, "):
        cache.rotate_and_write(slots, qkv[:, :, 1:], n_q, positions, cos, sin)
    with pytest.raises(ValueError, match="slot_mapping must be"):
        cache.rotate_and_write(slots[:, :2], qkv, n_q, positions, cos, sin)


def test_prefill_graph_shapes():
    """Which prefills run as a CUDA graph: a power of two of chunks, the longest rounded up to a
    PREFILL_GRAPH_LENGTHS length, at most PREFILL_GRAPH_TOKENS padded tokens; everything else eagerly (other counts
    would need padding rows, not yet run on a GPU)."""
    import types

    from fp6llm.engine.runner import PREFILL_GRAPH_TOKENS, Runner
    runner = types.SimpleNamespace(prefill_graphs=True)
    length = lambda count, longest: Runner.prefill_graph_length(runner, count, longest)  # noqa: E731
    assert length(1, 1) == 16 and length(1, 17) == 32 and length(1, 256) == 256
    assert length(4, 100) == 128 and length(2, 256) == 256 and length(3, 100) is None and length(5, 20) is None
    assert length(1, 257) is None and length(4, 200) is None  # too long; 4 x 256 > PREFILL_GRAPH_TOKENS
    assert all(length(c, n) * c <= PREFILL_GRAPH_TOKENS and length(c, n) >= n
               for c in range(1, 7) for n in range(1, 300, 7) if length(c, n) is not None)
    runner.prefill_graphs = False
    assert length(1, 16) is None


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_prefill_graphs_match_eager_prefill():
    """Prefills captured as CUDA graphs (padded lengths, full-width block tables, captured on first use, replayed
    after) against the same engine prefilling eagerly: the logits each step sampled from within 1e-2 while the
    greedy tokens agree (the prefill's always), for prompts of 3-200 tokens one by one and two in a batch, a prompt
    longer than the graphs take, a prompt whose prefill is chunked (a small step budget), and the prefix cache's
    shared blocks."""
    from fp6llm.models.loader import build_random
    model = build_random("tiny-llama", "e3m2", "cuda", dtype=torch.float16, seed=5, progress=False)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (3, 17, 64, 100, 200, 300)]
    prompts.append(prompts[3][:80] + torch.randint(3, 500, (30,), generator=gen).tolist())  # a shared prefix
    results = []
    for graphs in (True, False):
        outputs = []
        for step_tokens in (None, 48):  # 48: every prompt of more than 48 tokens prefills in chunks
            engine = Engine(model, None, max_batch_size=4, max_seq_len=384, cuda_graph=True,
                            max_step_tokens=step_tokens)
            engine.runner.prefill_graphs = graphs
            outputs.append(recorded_logits(engine, prompts[:2], 4))  # a batch of two
            outputs += [recorded_logits(engine, [p], 4) for p in prompts]  # one by one, the same graphs again
            if graphs and step_tokens is None:
                assert any(key[0] == "prefill" for key in engine.runner._graphs)
            engine.close()
        results.append(outputs)
    for (tokens, logits), (tokens_eager, logits_eager) in zip(*results):
        for row_tokens, row_eager, a, b in zip(tokens, tokens_eager, logits, logits_eager):
            agree = next((i for i, (x, y) in enumerate(zip(row_tokens, row_eager)) if x != y), len(row_tokens))
            steps = min(agree + 1, len(a))  # teacher-forced: the steps up to and including the first disagreement
            assert steps >= 1 and ((a[:steps] - b[:steps]).norm() / b[:steps].norm()).item() < 1e-2
