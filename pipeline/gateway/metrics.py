"""The gateway's counters and latency histograms, rendered in Prometheus' text format (0.0.4).

Recording is a few dict operations (the hot path pays about a microsecond); rendering happens
only when ``/metrics`` is scraped. Single-threaded by design: only the event loop touches it.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

# Seconds. LLM requests span milliseconds (count_tokens, errors) to minutes (long generations).
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


# Seconds from the gateway learning that an instance is ready to a held request written to it.
DISPATCH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.1, 1.0)


class Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{name}="{_label(value)}"' for name, value in pairs)


class Metrics:
    """Requests by (model, instance, code), errors by (model, instance, reason), resends
    to another replica by (model, instance that failed, reason), and per-model histograms of
    the whole request and of the time to the response head."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.errors: dict[tuple[str, str, str], int] = {}
        self.retries: dict[tuple[str, str, str], int] = {}
        self.duration: dict[tuple[str, str], Histogram] = {}
        self.first_byte: dict[tuple[str, str], Histogram] = {}
        self.stream_chunks: dict[tuple[str, str], int] = {}
        # Requests held while their model started or woke: how long, per model; and the
        # gateway's own part once the instance was ready (all models together).
        self.held: dict[tuple[str, str], Histogram] = {}
        self.held_dispatch = Histogram(DISPATCH_BUCKETS)

    def held_for(self, model: str, seconds: float) -> None:
        hist = self.held.get((model, ""))
        if hist is None:
            hist = self.held[(model, "")] = Histogram()
        hist.observe(seconds)

    def request(self, model: str, instance: str, code: int) -> None:
        key = (model, instance, code)
        self.requests[key] = self.requests.get(key, 0) + 1

    def error(self, model: str, instance: str, reason: str) -> None:
        key = (model, instance, reason)
        self.errors[key] = self.errors.get(key, 0) + 1

    def retry(self, model: str, instance: str, reason: str) -> None:
        key = (model, instance, reason)
        self.retries[key] = self.retries.get(key, 0) + 1

    def timing(
        self, model: str, instance: str, total: float, first_byte: float | None, chunks: int
    ) -> None:
        key = (model, instance)
        hist = self.duration.get(key)
        if hist is None:
            hist = self.duration[key] = Histogram()
            self.first_byte[key] = Histogram()
            self.stream_chunks[key] = 0
        hist.observe(total)
        if first_byte is not None:
            self.first_byte[key].observe(first_byte)
        self.stream_chunks[key] += chunks

    def render(self, gauges: list[tuple[str, str, str, list[tuple[dict[str, str], float]]]]) -> str:
        """The exposition text; ``gauges`` are (name, type, help, [(labels, value)])."""
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        family(
            "gateway_requests_total", "counter", "Requests answered, by model, instance and code."
        )
        for (model, instance, code), count in sorted(self.requests.items()):
            labels = _labels((("model", model), ("instance", instance), ("code", str(code))))
            out.append(f"gateway_requests_total{{{labels}}} {count}")
        family(
            "gateway_errors_total",
            "counter",
            "Requests that failed in or behind the gateway, by model, instance and reason.",
        )
        for (model, instance, reason), count in sorted(self.errors.items()):
            labels = _labels((("model", model), ("instance", instance), ("reason", reason)))
            out.append(f"gateway_errors_total{{{labels}}} {count}")
        family(
            "gateway_retries_total",
            "counter",
            "Requests resent to another replica because the instance failed before sending "
            "back a byte, by model, the instance that failed, and reason.",
        )
        for (model, instance, reason), count in sorted(self.retries.items()):
            labels = _labels((("model", model), ("instance", instance), ("reason", reason)))
            out.append(f"gateway_retries_total{{{labels}}} {count}")
        for name, table, help_text in (
            (
                "gateway_request_duration_seconds",
                self.duration,
                "Time from the request's arrival to its response's last byte.",
            ),
            (
                "gateway_held_seconds",
                self.held,
                "Time a request was held while its on-demand model started or woke.",
            ),
            (
                "gateway_held_dispatch_seconds",
                {("", ""): self.held_dispatch} if any(self.held_dispatch.counts) else {},
                "Time from the gateway learning that a held request's instance is ready to "
                "the request written to it (with a connect when none was opened ahead): the "
                "gateway's own part.",
            ),
            (
                "gateway_first_byte_seconds",
                self.first_byte,
                "Time from the request's arrival to the instance's response head.",
            ),
        ):
            family(name, "histogram", help_text)
            for (model, instance), hist in sorted(table.items()):
                base = _labels((("model", model), ("instance", instance)))
                running = 0
                for bound, count in zip((*hist.bounds, None), hist.counts, strict=True):
                    running += count
                    le = "+Inf" if bound is None else repr(bound)
                    out.append(f'{name}_bucket{{{base},le="{le}"}} {running}')
                out.append(f"{name}_sum{{{base}}} {hist.sum:.6f}")
                out.append(f"{name}_count{{{base}}} {running}")
        family(
            "gateway_response_pieces_total",
            "counter",
            "Pieces of response body relayed as they arrived (SSE events, in practice).",
        )
        for (model, instance), count in sorted(self.stream_chunks.items()):
            labels = _labels((("model", model), ("instance", instance)))
            out.append(f"gateway_response_pieces_total{{{labels}}} {count}")
        for name, kind, help_text, samples in gauges:
            family(name, kind, help_text)
            for labels, value in samples:
                shown = f"{{{_labels(sorted(labels.items()))}}}" if labels else ""
                out.append(f"{name}{shown} {value:g}")
        return "\n".join(out) + "\n"
