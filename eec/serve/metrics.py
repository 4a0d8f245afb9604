"""The server's figures in Prometheus' text format (``GET /metrics``), one registry per application.

A registry of its own (not prometheus-client's global one) so that two
applications in one process, as in tests or Ray Serve replicas, count apart.
Counters are what Prometheus wants (it takes rates itself); the throughput
gauge is there for someone reading ``/metrics`` by hand or with curl.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # the ``_created`` series double /metrics for a figure nobody plots

WINDOW_S = 10.0  # the throughput gauge's window


class Rate:
    """Events per second over the last ``window`` seconds (thread-safe)."""

    def __init__(self, window: float = WINDOW_S):
        self.window, self.marks, self.lock = window, deque(), threading.Lock()

    def add(self, n: int = 1) -> None:
        now = time.monotonic()
        with self.lock:
            self.marks.append((now, n))
            self._trim(now)  # here too: a server nobody scrapes must not keep every token's mark

    def __call__(self) -> float:
        now = time.monotonic()
        with self.lock:
            self._trim(now)
            return sum(n for _, n in self.marks) / self.window

    def _trim(self, now: float) -> None:
        while self.marks and self.marks[0][0] < now - self.window:
            self.marks.popleft()


class Metrics:
    def __init__(self, kind: str):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("eec_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "code"], registry=r)
        self.latency = Histogram("eec_request_seconds", "Time from a request's arrival to its last byte",
                                 ["endpoint"], registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.queue_depth = Gauge("eec_queue_depth", "Requests waiting for a row of the batch", registry=r)
        self.running = Gauge("eec_running_requests", "Requests being decoded or classified now", registry=r)
        self.throughput = Rate()
        self._judged = (0, 0)  # the monitor's checked and agreed tokens, for the agreement gauge
        if kind == "decoder":
            self.tokens = Counter("eec_generated_tokens", "Tokens generated", registry=r)
            self.prompt_tokens = Counter("eec_prompt_tokens", "Prompt tokens prefilled", registry=r)
            self.exits = Counter("eec_token_exits", "Generated tokens by the layer they left at", ["layer"], registry=r)
            self.first_token = Histogram("eec_time_to_first_token_seconds", "Time from arrival to the first token",
                                         registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
            Gauge("eec_tokens_per_second", f"Tokens generated per second over the last {WINDOW_S:g} s",
                  registry=r).set_function(self.throughput)
            self.checked = Counter("eec_monitor_checked_tokens",
                                   "Exited tokens the final head has judged (the live monitor)", registry=r)
            self.agreed = Counter("eec_monitor_agreed_tokens",
                                  "Of those, the ones the final head would have emitted too", registry=r)
            Gauge("eec_monitor_agreement", "Live agreement of exited tokens with the full model (NaN before any)",
                  registry=r).set_function(self._agreement)
        else:
            self.samples = Counter("eec_classified_samples", "Samples classified", registry=r)
            self.exits = Counter("eec_sample_exits", "Samples by the stage they left after", ["stage"], registry=r)
            Gauge("eec_samples_per_second", f"Samples classified per second over the last {WINDOW_S:g} s",
                  registry=r).set_function(self.throughput)

    def monitored(self, checked: int, agreed: int) -> None:
        """A finished request's monitor figures."""
        self.checked.inc(checked)
        self.agreed.inc(agreed)
        self._judged = (self._judged[0] + checked, self._judged[1] + agreed)

    def _agreement(self) -> float:
        checked, agreed = self._judged
        return agreed / checked if checked else float("nan")
