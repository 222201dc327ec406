"""Serving benchmark: N concurrent streaming clients against `fp6llm serve`, one server per weight format, one run.

    python bench/serve.py --random llama-2-13b --formats fp16,e3m2 --clients 1,8,32,64       # the GPU run
    python bench/serve.py --random tiny-llama --formats fp32,e3m2 --clients 1,8 --gen-len 16  # a CPU smoke check

For each format a server starts (``python -m fp6llm serve --max-batch <most clients> --max-model-len <prompt + gen>``,
or with the server's own defaults under ``--server-defaults``) on a free port, and for each client count N, N threads
each send ``--requests`` streaming completions one after the other (a closed loop): prompts of ``--prompt-len``
random token ids (N, or lengths drawn uniformly from LO-HI, seeded), ``--gen-len`` tokens each
(ignore_eos), greedy. Streams ask for ``continuous_usage_stats``, so the server sends a chunk for every token, and
the times are per token: time to first token (from sending the request), inter-token latency (gaps between tokens
of one request), requests/s and output tokens/s (all generated tokens over the wall time of that N). A short
warm-up round runs before each N. Writes bench/results/serve-<device>-<date>.{md,json}.

The server needs the ``serve`` extra (fastapi, uvicorn, prometheus-client); the client here uses only the standard
library. A GPU machine without network (ours has no fastapi/uvicorn) needs the wheels brought over: on a machine
with network and the same Python, ``pip download 'fastapi>=0.110' 'uvicorn>=0.29' 'prometheus-client>=0.20' -d
wheels/``, then on the GPU machine ``pip install --no-index --find-links wheels/ fastapi uvicorn prometheus-client``.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fp6llm.evals.throughput import write_results
from fp6llm.evals.timing import device_name

STARTUP_S = 1800  # building and quantizing a random 70B takes minutes
TOKEN_IDS = range(3, 259)  # the byte tokenizer's bytes; valid ids of every real vocabulary too
SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client")


@dataclass
class Timing:
    """One request: when it was sent, and when each of its tokens arrived (perf_counter seconds)."""

    sent: float
    token_times: list = field(default_factory=list)


@dataclass
class Row:
    format: str
    clients: int
    requests: int = 0
    seconds: float = 0.0
    requests_per_s: float = 0.0
    output_tokens_per_s: float = 0.0
    ttft_p50_ms: float = 0.0
    ttft_p99_ms: float = 0.0
    itl_p50_ms: float = 0.0
    itl_p99_ms: float = 0.0
    note: str = ""


# ---- the server -----------------------------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`python -m fp6llm serve ...` in a subprocess, its output in a log file; a context manager."""

    def __init__(self, args: list, log_path: Path):
        self.log_path = log_path
        self.host, self.port = "127.0.0.1", free_port()
        self.process = subprocess.Popen([sys.executable, "-m", "fp6llm", "serve", "--host", self.host, "--port",
                                         str(self.port), "--log-level", "warning", *args],
                                        stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        """Wait for /health to answer 200; RuntimeError with the log's tail if the server dies or never answers.
        (At --log-level warning uvicorn does not print its address, so the port is chosen here, not by uvicorn.)"""
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}): {self.log_tail()}")
            try:
                connection = http.client.HTTPConnection(self.host, self.port, timeout=5)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server did not start within {STARTUP_S} s: {self.log_tail()}")

    def log_tail(self) -> str:
        lines = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-3:])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# ---- the clients ----------------------------------------------------------------------------------------------------

def stream_completion(host: str, port: int, prompt: list, gen_len: int) -> Timing:
    """One streaming completion, timed per token (the server sends a chunk per token with continuous usage)."""
    body = {"prompt": prompt, "max_tokens": gen_len, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"continuous_usage_stats": True}}
    connection = http.client.HTTPConnection(host, port, timeout=600)
    timing = Timing(time.perf_counter())
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300].decode(errors='replace')}")
    tokens = 0
    for line in response:
        if not line.startswith(b"data: "):
            continue
        if line.startswith(b"data: [DONE]"):
            break
        now = time.perf_counter()
        event = json.loads(line[len(b"data: "):])
        if "error" in event:
            raise RuntimeError(f"error in the stream: {event['error']['message']}")
        count = event["usage"]["completion_tokens"]
        timing.token_times += [now] * (count - tokens)
        tokens = count
    connection.close()
    if tokens != gen_len:
        raise RuntimeError(f"a request got {tokens} tokens, not {gen_len}")
    return timing


def run_clients(host: str, port: int, clients: int, requests: int, prompt_len: tuple, gen_len: int,
                seed: int) -> tuple:
    """(timings of every request, wall seconds) of ``clients`` threads sending ``requests`` requests each; prompt
    lengths drawn uniformly from the range ``prompt_len`` (lo, hi), seeded."""
    rng = random.Random(seed)
    prompts = [[rng.choice(TOKEN_IDS) for _ in range(rng.randint(*prompt_len))] for _ in range(clients * requests)]
    timings, errors = [], []
    start = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        start.wait()
        try:
            for i in range(requests):
                timings.append(stream_completion(host, port, prompts[index * requests + i], gen_len))
        except Exception as err:  # reported once, after the others finish
            errors.append(err)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"{len(errors)} of {clients} clients failed: {errors[0]}")
    return timings, seconds


def percentile(values: list, q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarize(fmt: str, clients: int, timings: list, seconds: float) -> Row:
    ttft = [1e3 * (t.token_times[0] - t.sent) for t in timings]
    itl = [1e3 * (b - a) for t in timings for a, b in zip(t.token_times, t.token_times[1:])]
    tokens = sum(len(t.token_times) for t in timings)
    return Row(fmt, clients, len(timings), seconds, len(timings) / seconds, tokens / seconds,
               percentile(ttft, 50), percentile(ttft, 99),
               percentile(itl, 50) if itl else 0.0, percentile(itl, 99) if itl else 0.0)


# ---- the run --------------------------------------------------------------------------------------------------------

def bench_format(args, fmt: str, log_dir: Path) -> list:
    clients = args.clients
    server_args = ["--format", fmt]
    if not args.server_defaults:  # sized to the workload: every client decodes at once, nothing queues
        server_args += ["--max-batch", str(max(clients)), "--max-model-len", str(args.prompt_len[1] + args.gen_len),
                        "--max-queue", "0"]
    server_args += ["--random", args.random] if args.random else ["--model", args.model] if args.model else []
    server_args += ["--device", args.device] if args.device else []
    rows = []
    with Server(server_args, log_dir / f"server-{fmt}.log") as server:
        try:
            print(f"{fmt}: starting the server ...", flush=True)
            server.wait_ready()
        except RuntimeError as err:
            print(f"{fmt}: {err}", flush=True)
            return [Row(fmt, n, note=str(err)[:200]) for n in clients]
        for n in clients:
            try:
                run_clients(server.host, server.port, n, 1, args.prompt_len, min(args.gen_len, 8), seed=n)  # warm-up
                timings, seconds = run_clients(server.host, server.port, n, args.requests, args.prompt_len,
                                               args.gen_len, seed=1000 + n)
                row = summarize(fmt, n, timings, seconds)
            except RuntimeError as err:
                row = Row(fmt, n, note=str(err)[:200])
            print(format_row(row), flush=True)
            rows.append(row)
    return rows


TABLE_HEADER = ("| format | clients | requests | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | "
                "ITL p99 ms | note |\n|---|---|---|---|---|---|---|---|---|---|")


def format_row(row: Row) -> str:
    if row.note:
        return f"| {row.format} | {row.clients} | - | - | - | - | - | - | - | {row.note} |"
    return (f"| {row.format} | {row.clients} | {row.requests} | {row.requests_per_s:.2f} | "
            f"{row.output_tokens_per_s:.1f} | {row.ttft_p50_ms:.1f} | {row.ttft_p99_ms:.1f} | {row.itl_p50_ms:.2f} | "
            f"{row.itl_p99_ms:.2f} |  |")


def format_table(result: dict) -> str:
    setup = result["setup"]
    lines = [f"# Serving: {setup['model']} on {setup['device']} ({setup['date']})", "",
             f"{setup['prompt_len']} prompt tokens, {setup['gen_len']} generated tokens per request (greedy, "
             f"ignore_eos), {setup['requests_per_client']} requests per client one after the other; "
             + ("the server's own defaults (--max-batch, cache size, --max-model-len, --max-queue)"
                if setup.get("server_defaults") else "the server's --max-batch is the largest client count")
             + f". torch {setup['torch']}, fp6llm {setup['commit']}.", "",
             TABLE_HEADER]
    lines += [format_row(Row(**row)) for row in result["rows"]]
    return "\n".join(lines)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def int_list(text: str) -> list:
    values = [int(item) for item in text.split(",") if item.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need comma-separated positive integers, got {text!r}")
    return values


def length_range(text: str) -> tuple:
    """'128' -> (128, 128); '64-2048' -> (64, 2048)."""
    try:
        lo, _, hi = text.partition("-")
        bounds = (int(lo), int(hi or lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"need N or LO-HI, got {text!r}") from None
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        raise argparse.ArgumentTypeError(f"need 1 <= LO <= HI, got {text!r}")
    return bounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--random", default="llama-2-13b", help="random weights of a named shape (default "
                                                                "llama-2-13b)")
    source.add_argument("--model", help="a model directory instead of random weights")
    parser.add_argument("--formats", default="fp16,e3m2", help="comma-separated weight formats (default fp16,e3m2)")
    parser.add_argument("--clients", type=int_list, default=[1, 8, 32, 64], help="concurrent clients (default "
                                                                                 "1,8,32,64)")
    parser.add_argument("--requests", type=int, default=4, help="requests per client (default 4)")
    parser.add_argument("--prompt-len", type=length_range, default=(128, 128),
                        help="prompt tokens: N, or LO-HI for lengths drawn uniformly (default 128)")
    parser.add_argument("--server-defaults", action="store_true",
                        help="start each server with its own defaults instead of sizing it to the clients")
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--device", default=None, help="the server's device (default: cuda when available)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.model:
        args.random = None
    missing = [name for name in SERVE_MODULES if not _importable(name)]
    if missing:
        parser.error(f"the server needs {', '.join(missing)}: pip install 'fp6llm[serve]' (see this script's "
                     f"docstring for a machine without network)")
    if args.requests < 1 or args.gen_len < 2:
        parser.error("need --requests >= 1 and --gen-len >= 2")

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    result = {"setup": {"model": f"random:{args.random}" if args.random else args.model,
                        "device": device_name(args.device), "date": datetime.date.today().isoformat(),
                        "formats": formats, "clients": args.clients, "requests_per_client": args.requests,
                        "prompt_len": "-".join(map(str, sorted(set(args.prompt_len)))), "gen_len": args.gen_len,
                        "server_defaults": args.server_defaults, "torch": torch.__version__,
                        "commit": git_commit()},
              "rows": []}
    print(TABLE_HEADER, flush=True)
    with tempfile.TemporaryDirectory() as log_dir:
        for fmt in formats:
            result["rows"] += [asdict(row) for row in bench_format(args, fmt, Path(log_dir))]
    print(format_table(result))
    for path in write_results(result, args.out, "serve", format_table):
        print(f"wrote {path}")


def _importable(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    main()
