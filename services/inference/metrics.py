"""Prometheus metrics of the inference service, served on a side HTTP port.

Request/token counters and latency histograms are updated by the servicer; queue depth,
KV blocks and adapter-cache counters are read from the engine at scrape time by a
collector, so they never drift from the engine's own numbers.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServiceMetrics:
    def __init__(self, core):
        self.registry = CollectorRegistry()
        self.requests = Counter("loraserve_requests", "Generate requests by outcome", ["status"],
                                registry=self.registry)
        self.prompt_tokens = Counter("loraserve_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.generation_tokens = Counter("loraserve_generation_tokens", "Tokens generated", registry=self.registry)
        self.ttft = Histogram("loraserve_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("loraserve_time_per_output_token_seconds", "Mean time per output token after the first",
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
                              registry=self.registry)
        self.queue_time = Histogram("loraserve_queue_time_seconds", "Arrival to first scheduling",
                                    buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(core))
        self._server = None

    def observe_finished(self, out) -> None:
        m = out.metrics
        n = len(out.outputs[0].token_ids)
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generation_tokens.inc(n)
        if m is None:
            return
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
        if m.queue_time is not None:
            self.queue_time.observe(m.queue_time)
        if m.first_token_time is not None and m.finished_time is not None and n > 1:
            self.tpot.observe((m.finished_time - m.first_token_time) / (n - 1))

    def start(self, port: int, host: str = "127.0.0.1") -> int:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return server.server_port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


class _EngineCollector:
    def __init__(self, core):
        self.core = core

    def collect(self):
        stats = self.core.server_stats()
        yield GaugeMetricFamily("loraserve_queue_depth", "Requests waiting to be scheduled", value=stats["waiting"])
        yield GaugeMetricFamily("loraserve_running_requests", "Requests being computed", value=stats["running"])
        yield GaugeMetricFamily("loraserve_kv_blocks_free", "Free KV-cache blocks", value=stats["free_kv_blocks"])
        yield GaugeMetricFamily("loraserve_kv_blocks_total", "KV-cache blocks", value=stats["total_kv_blocks"])
        yield CounterMetricFamily("loraserve_kv_blocks_reused", "KV blocks served from the prefix cache",
                                  value=stats["reused_kv_blocks"])
        manager = self.core.lora_manager
        if manager is None:
            return
        lora = manager.stats_dict()
        yield GaugeMetricFamily("loraserve_adapter_gpu_slots", "Adapter slots in the GPU tier", value=lora["device_slots"])
        yield GaugeMetricFamily("loraserve_adapter_gpu_slots_used", "GPU adapter slots holding an adapter",
                                value=lora["device_slots_used"])
        yield GaugeMetricFamily("loraserve_adapter_host_adapters", "Adapters in the host tier", value=lora["host_adapters"])
        tiers = {"device": lora["device"], "host": lora["host"], "disk": vars(self.core.fetcher.stats)}
        for field, help_text in (("hits", "Adapter cache hits"), ("misses", "Adapter cache misses"),
                                 ("evictions", "Adapter cache evictions"), ("bytes_loaded", "Bytes loaded into the tier")):
            fam = CounterMetricFamily(f"loraserve_adapter_cache_{field}", f"{help_text} per tier", labels=["tier"])
            for tier, values in tiers.items():
                fam.add_metric([tier], values[field])
            yield fam
        fetcher = self.core.fetcher
        yield CounterMetricFamily("loraserve_adapter_registry_stale_served",
                                  "Adapter references served from the last resolution while the registry was unreachable",
                                  value=fetcher.stale_served)
        yield CounterMetricFamily("loraserve_adapter_registry_errors", "Registry calls that failed as unavailable",
                                  value=fetcher.registry_errors)
