"""`fp6llm serve`: the OpenAI-compatible HTTP server (fp6llm.server) under uvicorn.

Needs the ``serve`` extra (fastapi, uvicorn, prometheus-client); without it the command says so in one line. The
imports happen inside the command, so that ``import fp6llm`` and the other commands never import fastapi.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from ..cli import check_model_arguments, command, model_arguments, model_source, tp_argument

UVICORN_SHUTDOWN_MARGIN_S = 5  # uvicorn waits this much past the grace period for the last responses to go out
API_KEY_ENV = "FP6LLM_API_KEY"


@command("serve", "an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, streaming) that batches "
                  "concurrent requests")
def _serve_args(parser: argparse.ArgumentParser) -> None:
    model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--max-batch", type=int, default=32, help="requests decoded together at most; they are "
                                                                  "admitted by free KV-cache blocks (default 32)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="fraction of the GPU's memory for weights, KV cache and activations: the paged KV cache "
                             "takes what the weights leave, up to --max-batch x --max-model-len positions "
                             "(default 0.9)")
    parser.add_argument("--max-model-len", type=int, default=None, help="positions per request, prompt + generated "
                                                                        "(default min(max_position_embeddings, 2048))")
    parser.add_argument("--max-queue", type=int, default=None, help="requests that may wait for a slot beyond the "
                                                                    "running ones (default 4 x --max-batch); more get "
                                                                    "503")
    parser.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' on /v1/* (default: "
                                                        f"${API_KEY_ENV} if set, else no key)")
    parser.add_argument("--served-model-name", default=None, help="the model's name in the API (default: random:NAME "
                                                                  "or the model directory's name)")
    parser.add_argument("--shutdown-grace", type=float, default=5.0, help="seconds running requests may go on after "
                                                                          "SIGTERM / SIGINT before they are ended "
                                                                          "with an error (default 5)")
    parser.add_argument("--no-cuda-graph", action="store_true", help="run decode steps eagerly on CUDA too")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="server log level (default info)")
    tp_argument(parser)  # under torchrun: rank 0 serves HTTP, the other ranks follow its engine calls
    parser.set_defaults(run=_serve)


def _serve(args) -> None:
    check_model_arguments(args)
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as err:
        print(f"fp6llm serve: error: {err.name or err} is not installed; install the server's dependencies with "
              f"pip install 'fp6llm[serve]'", file=sys.stderr)
        raise SystemExit(2) from None

    from ..engine.distributed import process_group

    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.max_queue is not None and args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not args.shutdown_grace >= 0:
        raise ValueError(f"--shutdown-grace must be >= 0, got {args.shutdown_grace}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with process_group(args.tp, args.device) as (tp, device):
        _serve_on(args, tp, device, uvicorn)


def _serve_on(args, tp, device, uvicorn) -> None:
    """Load the engine (tp: this rank's slice) and serve it; under tensor parallelism rank 0 serves through a
    MirroredEngine and the other ranks follow it until it stops."""
    from ..engine import load
    from ..engine.distributed import control_group
    from ..engine.mirror import MirroredEngine, follow
    from ..server.app import create_app
    from ..server.scheduler import warm_up

    source = model_source(args)  # --model DIR, --random NAME, or neither: the embedded default model
    rank0 = tp is None or tp.rank == 0
    engine = load(source, args.format, args.group_size, device, max_batch_size=args.max_batch,
                  max_seq_len=args.max_model_len, cuda_graph=not args.no_cuda_graph, progress=rank0, tp=tp,
                  gpu_memory_utilization=args.gpu_memory_utilization)
    group = control_group() if tp is not None else None
    if not rank0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches every rank: only rank 0 stops, then says so
        follow(engine, group)
        return
    served = engine if tp is None else MirroredEngine(engine, group)
    if tp is not None:
        # uvicorn shuts down gracefully on SIGINT / SIGTERM, then raises the signal again under the handler that was
        # there before it: here a no-op, so that rank 0 goes on to release the followers and leave the group with
        # them (the default handler would kill it first, and torchrun would then kill the others).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
    try:
        warm_up(served)
        name = args.served_model_name or (source.name if source.random_name else source.path.name)
        api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
        logging.getLogger("fp6llm.server").info(
            "serving %s on %s%s: up to %d sequences of %d positions in a KV cache of %d blocks x %d positions, "
            "queue %s, API key %s", name, engine.device,
            f" and {tp.world_size - 1} more tensor-parallel rank(s)" if tp else "", args.max_batch,
            engine.max_seq_len, engine.num_blocks - 1, engine.block_size,
            args.max_queue if args.max_queue is not None else f"4 x {args.max_batch}",
            "required" if api_key else "not required")
        app = create_app(served, name, api_key=api_key, max_queue=args.max_queue,
                         shutdown_grace_s=args.shutdown_grace)

        class DrainingServer(uvicorn.Server):
            """On SIGINT / SIGTERM the app stops admitting and drains (create_app) while uvicorn shuts down."""

            def handle_exit(self, sig, frame) -> None:
                app.state.drain_soon()
                super().handle_exit(sig, frame)

        DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                      timeout_graceful_shutdown=args.shutdown_grace + UVICORN_SHUTDOWN_MARGIN_S)).run()
    finally:
        if tp is not None:
            served.stop()  # the followers return, and every rank leaves the process group together
