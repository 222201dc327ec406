"""Train a small Llama-architecture causal LM on the Python standard library's own source code.

The model gives fp6llm a real decoder whose training data every machine already has (no downloads): its float32
weights are the baseline against which FPx weights are judged by held-out perplexity and argmax agreement.

    python tools/train_stdlib_lm.py --out runs/stdlib-lm --device cuda --minutes 8    # the real run (GPU)
    python tools/train_stdlib_lm.py --out /tmp/stdlib-lm-tiny --tiny                  # CPU smoke test, ~30 s

What it does, all offline:
1. Collects every .py file under the running Python's stdlib directory (sysconfig), leaving out test/ and tests/
   directories, idlelib/, site-packages/ (third-party code) and the HELDOUT_MODULES below (a module, or a package
   with all its files). Files are read in sorted path order and joined with the end-of-text token. Every 20th
   training file is set aside as a validation split: it watches for over-fitting, so that no choice of the script
   ever looks at the held-out modules.
2. Trains a byte-level BPE tokenizer (tokenizers; --vocab-size, default 8192) on the training text.
3. Builds transformers.LlamaForCausalLM from a LlamaConfig: by default dim 384, 6 layers, 6 heads (head dim 64),
   MLP 1024, context 512, untied input and output embeddings (lm_head is its own matrix, as in Llama-2/3-8B):
   about 17M parameters with the 8k vocabulary.
4. Trains with AdamW (betas 0.9/0.95, weight decay 0.1 on matrices, gradient clip 1.0) on random windows of the
   token stream, learning rate warmed up linearly over --warmup-steps and then decayed along a cosine over the
   time budget or --max-epochs (default 16), whichever ends first: the number of steps is not known in advance.
   bf16 autocast on CUDA, float32 on CPU. The training text is small (about 2.7M tokens on CPython 3.11), so the
   run stops after --max-epochs passes, and the weights kept are those of the lowest validation loss seen (checked
   at every progress line). The whole run, setup and final evaluation included, stays within --minutes (plus the
   interpreter's start): training stops early enough for the evaluation and the save.
5. Prints the loss (nats/token) on up to --eval-windows windows of the training text and of the held-out text,
   then saves into --out:
     config.json, model.safetensors     (save_pretrained; float32 weights)
     tokenizer.json, tokenizer_config.json ...  (PreTrainedTokenizerFast: AutoTokenizer loads it offline)
     heldout.txt                         (the held-out modules' sources, joined with <|endoftext|> as in training)
     train_info.json                     (arguments, sizes, held-out modules, losses, tokens/s, Python version)
   and checks that AutoModelForCausalLM / AutoTokenizer reload the directory and give the same logits.

The tokenizer adds no special tokens of its own: tokenizer(text) of heldout.txt gives exactly the token stream the
held-out loss was measured on. The stdlib differs between Python versions; train_info.json records which one.
--tiny (dim 64, 2 layers, vocab 1024, context 128, 2 MB of text, 0.5 minutes) exists to test the script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# Fixed held-out set: small-to-medium pure-Python modules present in every CPython >= 3.9.
HELDOUT_MODULES = (
    "argparse", "bisect", "calendar", "colorsys", "csv", "dataclasses", "difflib", "fnmatch", "fractions", "glob",
    "graphlib", "heapq", "ipaddress", "json", "queue", "sched", "shlex", "statistics", "string", "textwrap",
)
EXCLUDED_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__"}
END_OF_TEXT = "<|endoftext|>"
TINY = dict(dim=64, layers=2, heads=2, intermediate=256, ctx=128, vocab_size=1024, batch_size=16, minutes=0.5,
            max_train_mb=2.0, eval_windows=16, val_windows=8, warmup_steps=20, log_every=5.0)
VALID_STRIDE = 20  # every 20th training file becomes a validation file
SAVE_RESERVE_S = 5.0  # time kept back for saving and the reload check


def log(message: str) -> None:
    print(f"[train_stdlib_lm] {message}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for the model, tokenizer and heldout.txt")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget for the whole run")
    parser.add_argument("--tiny", action="store_true", help="tiny model and data for a CPU smoke test")
    parser.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"], help="stdlib directory to read")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--ctx", type=int, default=512, help="context length (tokens per training window)")
    parser.add_argument("--tie-embeddings", action="store_true", help="share input and output embeddings")
    parser.add_argument("--batch-size", type=int, default=64, help="windows per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of the peak")
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--max-train-mb", type=float, default=None,
                        help="use about this much training text (every k-th file)")
    parser.add_argument("--max-epochs", type=float, default=16.0,
                        help="stop after this many passes over the training tokens (the data is small)")
    parser.add_argument("--eval-windows", type=int, default=256, help="windows per final loss estimate")
    parser.add_argument("--val-windows", type=int, default=64, help="validation windows per progress line")
    parser.add_argument("--log-every", type=float, default=15.0, help="seconds between progress lines")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.tiny:  # tiny settings become the defaults; flags given explicitly still win
        parser.set_defaults(**TINY)
        args = parser.parse_args(argv)
    if args.dim % args.heads:
        parser.error(f"--dim {args.dim} is not divisible by --heads {args.heads}")
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    return args


# ---- data ----------------------------------------------------------------------------------------------------

def read_source(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # a few stdlib files declare latin-1
        return data.decode("latin-1")


def split_stdlib(stdlib: Path) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) in sorted order; held-out = HELDOUT_MODULES' module files or packages."""
    heldout_roots = []
    for name in HELDOUT_MODULES:
        module, package = stdlib / f"{name}.py", stdlib / name
        if module.is_file():
            heldout_roots.append(module)
        elif (package / "__init__.py").is_file():
            heldout_roots.append(package)
        else:
            log(f"warning: held-out module {name!r} not found under {stdlib}")
    if not heldout_roots:
        sys.exit(f"no held-out module found under {stdlib}: is it a Python standard library directory?")
    train, heldout = [], []
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).parts
        if any(part in EXCLUDED_DIRS or part.startswith("config-") for part in parts[:-1]):
            continue
        if any(path == root or root in path.parents for root in heldout_roots):
            heldout.append(path)
        else:
            train.append(path)
    return train, heldout


def join_documents(paths: list[Path], max_bytes: float = math.inf) -> str:
    """Sources joined with END_OF_TEXT; with max_bytes, every k-th file so the sample spans the whole stdlib."""
    texts = [read_source(p) for p in paths]
    total = sum(len(t) for t in texts)
    if total > max_bytes:
        stride = math.ceil(total / max_bytes)
        texts = texts[::stride]
    return END_OF_TEXT.join(texts)


def train_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE tokenizer.Tokenizer with END_OF_TEXT as its one special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Train on file-sized chunks: the trainer's pre-tokenization is parallel over them.
    tokenizer.train_from_iterator(text.split(END_OF_TEXT), trainer=trainer)
    return tokenizer


def encode(tokenizer, text: str) -> torch.Tensor:
    """The token ids of ``text`` (END_OF_TEXT recognized as the special token) as a 1-D int64 tensor."""
    documents = text.split(END_OF_TEXT)
    eot = tokenizer.token_to_id(END_OF_TEXT)
    ids = []
    for i, encoding in enumerate(tokenizer.encode_batch(documents, add_special_tokens=False)):
        if i:
            ids.append(eot)
        ids.extend(encoding.ids)
    return torch.tensor(ids, dtype=torch.int64)


# ---- model and training --------------------------------------------------------------------------------------

def build_model(args, vocab_size: int, eot_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.dim, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.ctx, tie_word_embeddings=args.tie_embeddings,
        bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id,
    )
    return LlamaForCausalLM(config)


def window_losses(model, tokens: torch.Tensor, ctx: int, batch_size: int, device, autocast, max_windows: int,
                  deadline: float) -> tuple[float, int]:
    """Mean next-token loss over up to max_windows non-overlapping windows spread over ``tokens``.

    Returns (loss, windows evaluated); stops early at ``deadline`` (time.monotonic()).
    """
    count = min(max_windows, (len(tokens) - 1) // ctx)
    if count < 1:
        return float("nan"), 0
    starts = torch.linspace(0, len(tokens) - ctx - 1, count).long()
    total, done = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, count, batch_size):
            if done and time.monotonic() > deadline:
                break
            window = torch.stack([tokens[s:s + ctx + 1] for s in starts[i:i + batch_size].tolist()]).to(device)
            with autocast():
                logits = model(input_ids=window[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), window[:, 1:].flatten(), reduction="sum")
            total += float(loss)
            done += len(window)
    model.train()
    return total / (done * ctx), done


def learning_rate(args, step: int, progress: float) -> float:
    """Linear warm-up over steps, then cosine from the peak to min_lr_ratio * peak over the time budget."""
    warm = min(1.0, (step + 1) / max(args.warmup_steps, 1))
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * warm * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


def make_optimizer(model, args, device):
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and embeddings; not norms
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), **fused)


def prepare_data(args, out: Path, t0: float) -> dict:
    """Read and split the stdlib, write heldout.txt, train the tokenizer and encode the three splits."""
    stdlib = Path(args.stdlib)
    train_files, heldout_files = split_stdlib(stdlib)
    # A validation split of the training files (never trained on) watches for over-fitting, so that the held-out
    # modules stay untouched by every choice the script makes.
    valid_files = train_files[VALID_STRIDE // 2::VALID_STRIDE]
    train_files = [p for i, p in enumerate(train_files) if i % VALID_STRIDE != VALID_STRIDE // 2]
    max_bytes = args.max_train_mb * 2**20 if args.max_train_mb else math.inf
    texts = {"train": join_documents(train_files, max_bytes), "valid": join_documents(valid_files, max_bytes / 10),
             "heldout": join_documents(heldout_files)}
    (out / "heldout.txt").write_text(texts["heldout"], encoding="utf-8")
    log(f"Python {platform.python_version()} stdlib {stdlib}: {len(train_files)} training files "
        f"({len(texts['train']) / 2**20:.1f} MiB used), {len(valid_files)} validation files, "
        f"{len(heldout_files)} held-out files ({len(texts['heldout']) / 2**20:.2f} MiB) -> {out / 'heldout.txt'}")
    tokenizer = train_tokenizer(texts["train"], args.vocab_size)
    tokens = {name: encode(tokenizer, text) for name, text in texts.items()}
    log(f"tokenizer: {tokenizer.get_vocab_size()} tokens, {len(texts['train']) / len(tokens['train']):.2f} "
        f"bytes/token; tokens: " + ", ".join(f"{name} {len(t):,}" for name, t in tokens.items()) +
        f"; {time.monotonic() - t0:.0f} s so far")
    for name, ids in tokens.items():
        if len(ids) <= args.ctx + 1:
            sys.exit(f"only {len(ids)} {name} tokens: fewer than one window of --ctx {args.ctx}")
    return {"stdlib": stdlib, "tokenizer": tokenizer, "tokens": tokens,
            "files": {"train": len(train_files), "valid": len(valid_files), "heldout": len(heldout_files)}}


def main(argv=None) -> int:
    t0 = time.monotonic()
    args = parse_args(argv)
    budget_end = t0 + args.minutes * 60
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but torch sees no CUDA device")
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = prepare_data(args, out, t0)
    tokenizer, tokens = data["tokenizer"], data["tokens"]
    train_tokens = tokens["train"]
    max_tokens = args.max_epochs * len(train_tokens)

    model = build_model(args, tokenizer.get_vocab_size(), tokenizer.token_to_id(END_OF_TEXT)).to(device)
    params = sum(p.numel() for p in model.parameters())
    log(f"LlamaForCausalLM: {params / 1e6:.2f}M parameters, dim {args.dim}, {args.layers} layers, {args.heads} "
        f"heads, MLP {args.intermediate}, ctx {args.ctx}, tied embeddings: {args.tie_embeddings}; "
        f"device {device}; stops at {args.max_epochs} epochs ({max_tokens / 1e6:.1f}M tokens) or the time budget")
    forward_model = torch.compile(model) if args.compile else model
    optimizer = make_optimizer(model, args, device)
    use_bf16 = device.type == "cuda"
    if use_bf16:
        torch.backends.cuda.matmul.allow_tf32 = True

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)

    def loss_on(split: str, windows: int, deadline: float = math.inf) -> tuple[float, int]:
        return window_losses(model, tokens[split], args.ctx, args.batch_size, device, autocast, windows, deadline)

    gen = torch.Generator().manual_seed(args.seed)
    # Batches of the final evaluation: training and held-out text, and one validation check.
    final_eval_batches = 2 * math.ceil(args.eval_windows / args.batch_size) + math.ceil(args.val_windows /
                                                                                      args.batch_size)
    train_start = time.monotonic()
    step, tokens_seen, step_time, logged_loss, logged_steps = 0, 0, 0.0, 0.0, 0
    best_loss, best_weights, best_step = math.inf, None, 0  # by validation loss; weights copied to the CPU
    last_log = train_start
    model.train()
    while tokens_seen < max_tokens:
        now = time.monotonic()
        # A forward pass costs about a third of a training step: keep back time for the evaluation and the save.
        train_end = budget_end - final_eval_batches * step_time / 3 * 1.5 - SAVE_RESERVE_S
        if step > 0 and now + step_time > train_end:
            break
        progress = max((now - train_start) / max(train_end - train_start, 1e-9), tokens_seen / max_tokens)
        lr = learning_rate(args, step, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_tokens) - args.ctx - 1, (args.batch_size,), generator=gen)
        window = torch.stack([train_tokens[s:s + args.ctx + 1] for s in starts.tolist()]).to(device)
        with autocast():
            logits = forward_model(input_ids=window[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), window[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        tokens_seen += window[:, :-1].numel()
        logged_loss, logged_steps = logged_loss + loss.item(), logged_steps + 1  # item() syncs the device
        after = time.monotonic()
        # Smoothed step time (the first steps include warm-up / compilation).
        step_time = after - now if step <= 2 else 0.9 * step_time + 0.1 * (after - now)
        if after - last_log >= args.log_every:
            valid_loss, _ = loss_on("valid", args.val_windows)
            if valid_loss < best_loss:
                best_loss, best_step = valid_loss, step
                best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            elapsed = time.monotonic() - train_start
            log(f"step {step:6d}  loss {logged_loss / logged_steps:.4f}  valid {valid_loss:.4f}  lr {lr:.2e}  "
                f"{tokens_seen / elapsed:,.0f} tokens/s  {tokens_seen / len(train_tokens):.2f} epochs  "
                f"{time.monotonic() - t0:.0f}/{args.minutes * 60:.0f} s")
            last_log, logged_loss, logged_steps = time.monotonic(), 0.0, 0
    train_seconds = time.monotonic() - train_start
    log(f"trained {step} steps, {tokens_seen:,} tokens ({tokens_seen / len(train_tokens):.2f} epochs) in "
        f"{train_seconds:.0f} s: {tokens_seen / train_seconds:,.0f} tokens/s")

    eval_deadline = budget_end - SAVE_RESERVE_S
    valid_loss, _ = loss_on("valid", args.val_windows, eval_deadline)
    kept_step = step
    if best_weights is not None and best_loss < valid_loss:
        log(f"validation loss {valid_loss:.4f} at the end is above its best {best_loss:.4f} (step {best_step}): "
            f"keeping the weights of step {best_step}")
        model.load_state_dict(best_weights)
        valid_loss, kept_step = best_loss, best_step
    losses = {}
    for split in ("train", "heldout"):
        loss, windows = loss_on(split, args.eval_windows, eval_deadline)
        losses[split] = {"loss": loss, "ppl": math.exp(loss), "windows": windows}
    log(f"train loss {losses['train']['loss']:.4f} (ppl {losses['train']['ppl']:.2f}); validation loss "
        f"{valid_loss:.4f}; held-out loss {losses['heldout']['loss']:.4f} (ppl {losses['heldout']['ppl']:.2f}) "
        f"on {losses['heldout']['windows']} windows of {args.ctx} tokens")

    save(model, tokenizer, args, out, {
        "python": platform.python_version(), "stdlib": str(data["stdlib"]), "torch": torch.__version__,
        "device": str(device), "autocast_bf16": use_bf16, "parameters": params,
        "heldout_modules": list(HELDOUT_MODULES), "files": data["files"],
        "tokens": {name: len(t) for name, t in tokens.items()}, "steps": step, "tokens_seen": tokens_seen,
        "kept_step": kept_step,
        "train_seconds": round(train_seconds, 1), "tokens_per_second": round(tokens_seen / train_seconds),
        "losses": losses, "valid_loss": valid_loss, "args": vars(args),
    })
    log(f"saved to {out} after {time.monotonic() - t0:.0f} s (budget {args.minutes * 60:.0f} s)")
    return 0


def save(model, tokenizer, args, out: Path, info: dict) -> None:
    """save_pretrained (safetensors) + a PreTrainedTokenizerFast + train_info.json; then reload and compare."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    model = model.to("cpu").float().eval()
    model.save_pretrained(out)  # safetensors is the default format (transformers >= 4.35; the only one in 5.x)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                   pad_token=END_OF_TEXT, model_max_length=args.ctx)
    fast.save_pretrained(out)
    (out / "train_info.json").write_text(json.dumps(info, indent=1))
    if not (out / "model.safetensors").is_file():
        sys.exit(f"save_pretrained wrote no model.safetensors into {out}")

    reloaded_tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    sample = "def f(x):\n    return x + 1\n" + END_OF_TEXT + "import os\n"
    ids = reloaded_tokenizer(sample)["input_ids"]
    if ids != encode(tokenizer, sample).tolist():
        sys.exit("the saved tokenizer does not reproduce the training tokenization")
    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).float().eval()
    with torch.no_grad():
        x = torch.tensor([ids])
        err = (reloaded(input_ids=x).logits - model(input_ids=x).logits).abs().max().item()
    if err > 1e-4:
        sys.exit(f"the reloaded model's logits differ by {err:.2e}")
    log(f"reload check: AutoTokenizer + AutoModelForCausalLM from {out}, logits max diff {err:.1e}")


if __name__ == "__main__":
    sys.exit(main())
