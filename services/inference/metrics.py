"""Prometheus metrics of the inference service, served on a side HTTP port.

Request series (counts by code and finish reason, tokens, TTFT, E2E latency, lengths, per
adapter) come from InferenceCore's one RequestRecord per request, whatever the front
(request_metrics.py). Queue depth, KV blocks and adapter-cache counters are read from the
core at scrape time by a collector, so they never drift from the engine's own numbers.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .request_metrics import AdapterLabels, RequestMetrics


class ServiceMetrics:
    def __init__(self, core, max_adapter_labels: int = 32):
        self.registry = CollectorRegistry()
        # per adapter, bounded cardinality: see AdapterLabels
        self.adapter_labels = AdapterLabels(max_adapter_labels)
        self.request_metrics = RequestMetrics(self.registry, self.adapter_labels)
        self.registry.register(_EngineCollector(core, self.adapter_labels))
        self._core = core
        core.request_listeners.append(self.request_metrics.observe)
        self._server = None

    def start(self, port: int, host: str = "127.0.0.1") -> int:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return server.server_port

    def stop(self) -> None:
        if self.request_metrics.observe in self._core.request_listeners:
            self._core.request_listeners.remove(self.request_metrics.observe)
        if self._server is not None:
            self._server.shutdown()
            self._server = None


class _EngineCollector:
    """Gauges and counters read from the core at scrape time (its facade only). The engine's carry
    model_name; the adapter cache's are per tier (one cache per process), per-adapter ones the
    bounded `adapter` label alone."""

    def __init__(self, core, adapter_labels: AdapterLabels):
        self.core, self.adapter_labels = core, adapter_labels

    def collect(self):
        model = self.core.model_name
        stats = self.core.server_stats()

        def gauge(name: str, help_text: str, value) -> GaugeMetricFamily:
            fam = GaugeMetricFamily(name, help_text, labels=["model_name"])
            fam.add_metric([model], value)
            return fam

        yield gauge("loraserve_queue_depth", "Requests waiting to be scheduled", stats["waiting"])
        yield gauge("loraserve_running_requests", "Requests being computed", stats["running"])
        yield gauge("loraserve_kv_blocks_free", "Free KV-cache blocks", stats["free_kv_blocks"])
        yield gauge("loraserve_kv_blocks", "KV-cache blocks", stats["total_kv_blocks"])
        fam = CounterMetricFamily("loraserve_kv_blocks_reused", "KV blocks served from the prefix cache",
                                  labels=["model_name"])
        fam.add_metric([model], stats["reused_kv_blocks"])
        yield fam
        # requests per adapter (what vLLM's lora_requests_info lists in label values, here one series per
        # bounded adapter label): in flight in the core (incl. loading their adapter), running, waiting
        queues = self.core.adapter_queues()
        for name, help_text, counts in (
                ("active", "Requests in flight by adapter (loading their adapter, waiting or running)",
                 dict(self.core.active_by_adapter)),
                ("running", "Requests running in the engine by adapter", queues["running"]),
                ("waiting", "Requests waiting in the engine's queue by adapter", queues["waiting"])):
            fam = GaugeMetricFamily(f"loraserve_adapter_{name}_requests", help_text, labels=["adapter"])
            by_label: dict[str, int] = {}
            for adapter, n in counts.items():
                label = self.adapter_labels.label(adapter)
                by_label[label] = by_label.get(label, 0) + n
            for label, n in sorted(by_label.items()):
                fam.add_metric([label], n)
            yield fam
        cache = self.core.adapter_cache()
        if not cache.device_slots:
            return
        yield gauge("loraserve_adapter_gpu_slots", "Adapter slots in the GPU tier", cache.device_slots)
        yield gauge("loraserve_adapter_gpu_slots_used", "GPU adapter slots holding an adapter", cache.device_slots_used)
        yield gauge("loraserve_adapter_gpu_slots_pinned", "GPU adapter slots used by running requests",
                    cache.device_slots_pinned)
        yield gauge("loraserve_adapter_host_adapters", "Adapters in the host tier", cache.host_adapters)
        yield gauge("loraserve_adapter_host_bytes", "Bytes of adapters in the host tier", cache.host_bytes)
        yield gauge("loraserve_adapter_host_loading", "Adapters being loaded into the host tier", cache.host_loading)
        yield CounterMetricFamily("loraserve_adapter_slot_handoffs", "Admissions that held a GPU slot for the "
                                  "oldest waiting adapter while its running requests drained (fairness)",
                                  value=cache.slot_handoffs)
        tiers = {"device": cache.device, "host": cache.host, "disk": cache.disk}
        for name, key, help_text in (("hits", "hits", "Adapter cache hits"), ("misses", "misses", "Adapter cache misses"),
                                     ("evictions", "evictions", "Adapter cache evictions"),
                                     ("loaded_bytes", "bytes_loaded", "Bytes loaded into the tier")):
            fam = CounterMetricFamily(f"loraserve_adapter_cache_{name}", f"{help_text} per tier", labels=["tier"])
            for tier, values in tiers.items():
                fam.add_metric([tier], values[key])
            yield fam
        registry = self.core.registry_stats()
        for name, help_text in (("stale_served", "Adapter references served from the last resolution while the "
                                                 "registry was unreachable"),
                                ("errors", "Registry calls that failed as unavailable")):
            yield CounterMetricFamily(f"loraserve_adapter_registry_{name}", help_text, value=registry[name])
