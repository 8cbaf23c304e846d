"""Server metrics: request counters and latency histograms in the Prometheus text format (no client library)."""

from __future__ import annotations

import threading
from collections import Counter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Counters and latency histograms, rendered in the Prometheus text format (no client library needed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency: dict[str, list[float]] = {}  # endpoint -> bucket counts + [sum, count]
        self.totals: Counter[str] = Counter()

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            hist = self.latency.setdefault(endpoint, [0.0] * (len(LATENCY_BUCKETS) + 2))
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    hist[i] += 1
            hist[-2] += seconds
            hist[-1] += 1

    def add(self, **values: float) -> None:
        with self._lock:
            for name, value in values.items():
                self.totals[name] += value

    def render(self, gauges: dict[str, float]) -> str:
        """The ``/metrics`` page."""
        help_ = {"inputs": "Inputs embedded.", "tokens": "Tokens embedded (prompt and special tokens included).",
                 "forward_groups": "Groups of queued requests run together by the model worker.",
                 "grouped_requests": "Requests run in those groups.", "search_queries": "Queries searched.",
                 "rerank_documents": "Documents reranked."}
        lines = ["# HELP embed_corpus_requests_total HTTP requests by route and status.",
                 "# TYPE embed_corpus_requests_total counter"]
        with self._lock:
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'embed_corpus_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            lines += ["# HELP embed_corpus_request_seconds Request latency.",
                      "# TYPE embed_corpus_request_seconds histogram"]
            for endpoint, hist in sorted(self.latency.items()):
                for bound, count in zip(LATENCY_BUCKETS, hist, strict=False):
                    lines.append(f'embed_corpus_request_seconds_bucket{{endpoint="{endpoint}",le="{bound}"}} '
                                 f"{int(count)}")
                lines.append(f'embed_corpus_request_seconds_bucket{{endpoint="{endpoint}",le="+Inf"}} {int(hist[-1])}')
                lines.append(f'embed_corpus_request_seconds_sum{{endpoint="{endpoint}"}} {hist[-2]:.6f}')
                lines.append(f'embed_corpus_request_seconds_count{{endpoint="{endpoint}"}} {int(hist[-1])}')
            for name, text in help_.items():
                lines += [f"# HELP embed_corpus_{name}_total {text}", f"# TYPE embed_corpus_{name}_total counter",
                          f"embed_corpus_{name}_total {int(self.totals[name])}"]
        for name, value in gauges.items():
            lines += [f"# TYPE embed_corpus_{name} gauge", f"embed_corpus_{name} {value:g}"]
        return "\n".join(lines) + "\n"


