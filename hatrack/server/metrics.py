"""Prometheus metrics of one server. A registry per app, so tests can run several.

Running totals are counters (`..._total`); label sets stay bounded: at each scrape the
series of adapter versions that left the registry are removed, and `hatrack_adapter_loaded`
shows only the adapters in device slots. What one scrape shows can be narrowed to the
models a caller's key may use, so a tenant never learns another tenant's adapter names.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
# labels whose value names a model (a base name or `adapter@version`)
_MODEL_LABELS = ("model", "adapter")


class _EngineTotals(Collector):
    """The engine's running totals as counters, read from the stats of the last scrape
    (the engine owns the numbers; copying them into Counters would need deltas)."""

    def __init__(self) -> None:
        self.stats = None

    def collect(self) -> Iterator[CounterMetricFamily]:
        s = self.stats
        yield CounterMetricFamily("hatrack_engine_generated_tokens",
                                  "Tokens sampled by the engine since start, cancelled requests included",
                                  value=s.tokens_generated if s else 0)
        yield CounterMetricFamily("hatrack_engine_decode_steps", "Decode steps run since start",
                                  value=s.steps if s else 0)
        yield CounterMetricFamily("hatrack_engine_fused_steps",
                                  "Decode steps that also prefilled newly arrived prompts, in the same forward",
                                  value=s.fused_steps if s else 0)
        yield CounterMetricFamily("hatrack_engine_decode_seconds",
                                  "Time spent in decode steps since start (prompts prefilled in them included)",
                                  value=s.decode_seconds if s else 0.0)
        yield CounterMetricFamily("hatrack_engine_prefill_seconds", "Time spent prefilling prompts in forwards of their own since start",
                                  value=s.prefill_seconds if s else 0.0)
        yield CounterMetricFamily("hatrack_engine_prefill_tokens", "Prompt tokens prefilled since start",
                                  value=s.prefill_tokens if s else 0)
        yield CounterMetricFamily("hatrack_engine_prefix_cache_hits",
                                  "Prompts that started from a cached prefix of their own adapter",
                                  value=s.prefix_cache_hits if s else 0)
        yield CounterMetricFamily("hatrack_engine_prefix_cache_tokens",
                                  "Prompt tokens taken from cached prefixes instead of being prefilled",
                                  value=s.prefix_cache_tokens if s else 0)
        yield CounterMetricFamily("hatrack_engine_shared_prompts",
                                  "Prompts answered from another running request's prefill of the same prompt and adapter",
                                  value=s.shared_prompts if s else 0)


class _Visible:
    """A view of a registry that keeps only the samples whose model labels pass `visible`."""

    def __init__(self, registry: CollectorRegistry, visible: Callable[[str], bool]) -> None:
        self.registry = registry
        self.visible = visible

    def collect(self) -> Iterable[Metric]:
        for family in self.registry.collect():
            kept = Metric(family.name, family.documentation, family.type, family.unit)
            kept.samples = [s for s in family.samples
                            if all(self.visible(s.labels[k]) for k in _MODEL_LABELS if k in s.labels)]
            yield kept


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
            "hatrack_adapter_loaded", "1 for each adapter version in a device slot", ["adapter"], registry=r,
        )
        self.adapter_load_seconds = Histogram(
            "hatrack_adapter_load_seconds", "Time to bring an adapter into a device slot",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5), registry=r,
        )
        self._totals = _EngineTotals()
        r.register(self._totals)
        self._by_model = (self.requests, self.latency, self.ttft, self.tokens)
        self._seen_loads = 0
        self._shown_adapters: set[str] = set()

    def refresh_from(self, stats) -> None:
        """Copy the engine's current stats into the metrics (called at scrape time)."""
        self.queue_depth.set(stats.queue_depth)
        self.running.set(stats.running)
        self._totals.stats = stats
        loaded = {key.split(":")[0] for key in stats.loaded_adapters}  # key: "name@version:sha256"
        self.loaded_adapters.set(len(loaded))
        for label in self._shown_adapters - loaded:  # evicted: the series goes, not a 0 forever
            self.adapter_loaded.remove(label)
        for label in loaded:
            self.adapter_loaded.labels(adapter=label).set(1)
        self._shown_adapters = loaded
        # the engine keeps only its recent load times: observe the ones since the last scrape
        new = stats.adapter_loads_total - self._seen_loads
        if new > 0:
            for seconds in list(stats.adapter_load_seconds)[-new:]:
                self.adapter_load_seconds.observe(seconds)
        self._seen_loads = stats.adapter_loads_total

    def forget_models_except(self, live: set[str]) -> None:
        """Remove every per-model series whose model is not in `live` (base name and the
        `name@version` labels still in the registry): pruned versions leave the output."""
        for metric in self._by_model:
            shown = {s.labels["model"] for family in metric.collect() for s in family.samples}
            for model in shown - live:
                metric.remove_by_labels({"model": model})

    def render(self, visible: Callable[[str], bool] | None = None) -> bytes:
        """The text format; with `visible`, only series whose model labels pass it."""
        return generate_latest(self.registry if visible is None else _Visible(self.registry, visible))
