"""Prometheus metrics of the registry (served on a side HTTP port when metrics_port is set)."""
from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter("loraserve_registry_requests_total", "Registry RPCs by method and status code",
                   ["method", "code"])
LATENCY = Histogram("loraserve_registry_request_seconds", "Registry RPC handling time", ["method"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
UPLOADED_BYTES = Counter("loraserve_registry_uploaded_bytes_total", "Artifact bytes accepted into the registry")
DOWNLOADED_BYTES = Counter("loraserve_registry_downloaded_bytes_total", "Artifact bytes streamed to clients")
DEDUPLICATED = Counter("loraserve_registry_deduplicated_total", "Uploads whose bytes were already stored")
AUTH_REFUSED = Counter("loraserve_registry_auth_refused_total", "Calls refused for a missing or wrong token",
                       ["method"])
