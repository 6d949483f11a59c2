"""Prometheus metrics of one server. A registry per app, so tests can run several."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "hatrack_requests", "Requests answered, by endpoint, model and HTTP status",
            ["endpoint", "model", "status"], registry=r,
        )
        self.latency = Histogram(
            "hatrack_request_latency_seconds", "Time from request to last token",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "hatrack_time_to_first_token_seconds", "Time from request to first token",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.tokens = Counter(
            "hatrack_generated_tokens", "Completion tokens generated", ["model"], registry=r,
        )
        self.queue_depth = Gauge("hatrack_queue_depth", "Requests waiting for a batch row", registry=r)
        self.running = Gauge("hatrack_running_batch_size", "Sequences in the running batch", registry=r)
        self.loaded_adapters = Gauge(
            "hatrack_loaded_adapters", "Adapters in device slots", registry=r,
        )
        self.adapter_loaded = Gauge(
            "hatrack_adapter_loaded", "1 if this adapter is in a device slot", ["adapter"], registry=r,
        )
        self.adapter_load_seconds = Histogram(
            "hatrack_adapter_load_seconds", "Time to bring an adapter into a device slot",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5), registry=r,
        )
        self.engine_tokens = Gauge(
            "hatrack_engine_generated_tokens",
            "Tokens sampled by the engine since start, cancelled requests included", registry=r,
        )
        self.engine_steps = Gauge("hatrack_engine_decode_steps", "Decode steps run since start", registry=r)
        self.engine_decode_seconds = Gauge(
            "hatrack_engine_decode_seconds", "Time spent in decode steps since start", registry=r,
        )
        self.engine_prefill_seconds = Gauge(
            "hatrack_engine_prefill_seconds", "Time spent prefilling prompts since start", registry=r,
        )
        self._seen_loads = 0
        self._shown_adapters: set[str] = set()

    def refresh_from(self, stats) -> None:
        """Copy the engine's current stats into the gauges (called at scrape time)."""
        self.queue_depth.set(stats.queue_depth)
        self.running.set(stats.running)
        self.engine_tokens.set(stats.tokens_generated)
        self.engine_steps.set(stats.steps)
        self.engine_decode_seconds.set(stats.decode_seconds)
        self.engine_prefill_seconds.set(stats.prefill_seconds)
        loaded = set(stats.loaded_adapters)
        self.loaded_adapters.set(len(loaded))
        for key in self._shown_adapters | loaded:
            self.adapter_loaded.labels(adapter=key.split(":")[0]).set(1 if key in loaded else 0)
        self._shown_adapters |= loaded
        # the engine keeps only its recent load times: observe the ones since the last scrape
        new = stats.adapter_loads_total - self._seen_loads
        if new > 0:
            for seconds in list(stats.adapter_load_seconds)[-new:]:
                self.adapter_load_seconds.observe(seconds)
        self._seen_loads = stats.adapter_loads_total

    def render(self) -> bytes:
        return generate_latest(self.registry)
