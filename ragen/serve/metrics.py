"""Prometheus metrics for ``ragen serve``: counters, gauges and histograms in the text exposition format.

A few dozen lines instead of a dependency: the server needs labelled counters, callback gauges and
fixed-bucket histograms, all updated from the event loop and the inference thread (hence one lock).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536)

Labels = tuple[tuple[str, str], ...]


def _fmt_labels(labels: Labels, extra: Labels = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    esc = [(k, v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')) for k, v in items]
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc) + "}"


def _fmt_value(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Metrics:
    """A registry of named metrics. ``inc``/``observe``/``set`` create a series on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}  # name -> (type, help)
        self._counters: dict[str, dict[Labels, float]] = {}
        self._gauges: dict[str, dict[Labels, float]] = {}
        self._callbacks: dict[str, Callable[[], float]] = {}
        self._hist: dict[str, tuple[Sequence[float], dict[Labels, list[float]]]] = {}

    def counter(self, name: str, help: str) -> None:
        self._help[name] = ("counter", help)
        self._counters.setdefault(name, {})

    def gauge(self, name: str, help: str, callback: Callable[[], float] | None = None) -> None:
        self._help[name] = ("gauge", help)
        self._gauges.setdefault(name, {})
        if callback is not None:
            self._callbacks[name] = callback

    def histogram(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self._help[name] = ("histogram", help)
        self._hist.setdefault(name, (tuple(buckets), {}))

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._gauges[name][tuple(sorted(labels.items()))] = float(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            buckets, series = self._hist[name]
            row = series.get(key)
            if row is None:
                row = series[key] = [0.0] * (len(buckets) + 2)  # per-bucket counts, then sum, then count
            for i, bound in enumerate(buckets):
                if value <= bound:
                    row[i] += 1
                    break
            row[-2] += value
            row[-1] += 1

    def value(self, name: str, **labels: str) -> float:
        """A counter's or gauge's current value (0 when never set); a histogram's observation count."""
        key = tuple(sorted(labels.items()))
        with self._lock:
            if name in self._counters:
                return self._counters[name].get(key, 0.0)
            if name in self._hist:
                row = self._hist[name][1].get(key)
                return row[-1] if row else 0.0
            return self._gauges[name].get(key, 0.0)

    def render(self) -> str:
        """All metrics in the Prometheus text format (version 0.0.4)."""
        lines: list[str] = []
        with self._lock:
            for name, (kind, help) in self._help.items():
                lines.append(f"# HELP {name} {help}")
                lines.append(f"# TYPE {name} {kind}")
                if kind == "counter":
                    for labels, v in sorted(self._counters[name].items()):
                        lines.append(f"{name}{_fmt_labels(labels)} {_fmt_value(v)}")
                elif kind == "gauge":
                    if name in self._callbacks:
                        lines.append(f"{name} {_fmt_value(self._callbacks[name]())}")
                    for labels, v in sorted(self._gauges[name].items()):
                        lines.append(f"{name}{_fmt_labels(labels)} {_fmt_value(v)}")
                else:
                    buckets, series = self._hist[name]
                    for labels, row in sorted(series.items()):
                        cumulative = 0.0
                        for bound, n in zip(buckets, row):
                            cumulative += n
                            lines.append(f"{name}_bucket{_fmt_labels(labels, (('le', _fmt_value(bound)),))} "
                                         f"{_fmt_value(cumulative)}")
                        lines.append(f"{name}_bucket{_fmt_labels(labels, (('le', '+Inf'),))} {_fmt_value(row[-1])}")
                        lines.append(f"{name}_sum{_fmt_labels(labels)} {_fmt_value(row[-2])}")
                        lines.append(f"{name}_count{_fmt_labels(labels)} {_fmt_value(row[-1])}")
        return "\n".join(lines) + "\n"


def server_metrics(queue_depth: Callable[[], float]) -> Metrics:
    """The metrics ``ragen serve`` exports."""
    m = Metrics()
    m.counter("ragen_requests_total", "HTTP requests answered, by route and status code.")
    m.histogram("ragen_request_duration_seconds", "Time from request arrival to answer, by route.", LATENCY_BUCKETS)
    m.counter("ragen_rejected_total", "Requests refused before inference, by reason (queue_full, too_large, ...).")
    m.gauge("ragen_queue_depth", "Requests waiting for the inference worker.", queue_depth)
    m.histogram("ragen_queue_wait_seconds", "Time a job waited before the inference worker took it.", LATENCY_BUCKETS)
    m.histogram("ragen_batch_size", "Texts per model forward batch.", SIZE_BUCKETS)
    m.histogram("ragen_batch_tokens", "Padded tokens per model forward batch (batch size x longest input).",
                TOKEN_BUCKETS)
    m.histogram("ragen_batch_requests", "Requests merged into one worker cycle.", SIZE_BUCKETS)
    m.histogram("ragen_inference_seconds", "Model time per forward batch or exclusive call, by kind.", LATENCY_BUCKETS)
    m.counter("ragen_tokens_total", "Input tokens embedded, decoded or searched, by route.")
    m.counter("ragen_inputs_total", "Texts embedded, by input type.")
    m.gauge("ragen_index_generation", "Committed generation each served index was last searched at.")
    m.counter("ragen_completion_tokens_total", "Tokens generated by finished chat completions.")
    m.counter("ragen_chat_steps_total", "Chat generation steps run on the inference worker.")
    m.counter("ragen_chat_abandoned_total", "Chat generations stopped before their end (client gone, error).")
    m.counter("ragen_guard_blocked_total", "Queries the refusal guard blocked, by index.")
    return m


__all__ = ["Metrics", "server_metrics", "LATENCY_BUCKETS"]
