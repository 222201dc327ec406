"""Prometheus metrics of one server, in a registry of its own (two apps in one process do not share counts)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Counters, gauges and histograms of the HTTP side and the engine loop; ``render()`` is the /metrics body.

    Updated from both the event loop and the engine thread (prometheus_client's metrics are thread-safe).
    """

    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter("fp6llm_requests", "Finished HTTP requests by endpoint and status code (499: the "
                                "client went away)", ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("fp6llm_prompt_tokens", "Prompt tokens of requests that reached the engine",
                                     registry=registry)
        self.generated_tokens = Counter("fp6llm_generation_tokens", "Tokens generated", registry=registry)
        self.queue_depth = Gauge("fp6llm_queue_depth", "Requests waiting for a slot of the decode batch",
                                 registry=registry)
        self.running = Gauge("fp6llm_running_requests", "Requests in a slot of the decode batch", registry=registry)
        self.batch_slots = Gauge("fp6llm_batch_slots", "Slots of the decode batch (KV cache rows, --max-batch)",
                                 registry=registry)
        self.batch_slots.set(max_batch)
        self.batch_occupancy = Gauge("fp6llm_batch_occupancy", "Fraction of the decode batch's slots in use",
                                     registry=registry)
        sizes = sorted({1 << i for i in range(max_batch.bit_length())} | {max_batch})
        self.decode_batch = Histogram("fp6llm_decode_batch_size", "Active slots per decode step",
                                      buckets=sizes, registry=registry)
        self.time_to_first_token = Histogram("fp6llm_time_to_first_token_seconds", "From arrival to the first token",
                                             buckets=LATENCY_BUCKETS, registry=registry)
        self.request_seconds = Histogram("fp6llm_request_seconds", "From arrival to the last token",
                                         buckets=LATENCY_BUCKETS, registry=registry)

    def follow(self, load: Callable[[], tuple]) -> None:
        """Read the queue and running gauges from ``load()`` -> (waiting, running) whenever they are scraped, so that
        they are never a step behind (a burst of disconnects shows at once)."""
        self.queue_depth.set_function(lambda: load()[0])
        self.running.set_function(lambda: load()[1])
        self.batch_occupancy.set_function(lambda: load()[1] / self.max_batch)

    def render(self) -> tuple:
        """(body bytes, content type) in the Prometheus text format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
