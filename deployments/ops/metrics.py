"""Every Prometheus metric lens-serve emits (DESIGN §Metrics), with its name, tags and buckets.

Created in `__init__` of the class that uses it, so Serve adds its deployment, replica and
application tags; Ray exports each as `ray_<name>` (counters as `ray_<name>_total`). The
ingress also keeps its own `prometheus_client` registry for `GET /metrics` (`RouterMetrics`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram as PromHistogram
from prometheus_client import ProcessCollector as PromProcessCollector
from ray.serve.metrics import Counter, Gauge, Histogram

# Lens switches run from a dict lookup (about 1 ms) to a cold base load on a GPU node (a
# minute or two): cover 1 ms .. 120 s, about three buckets per decade.
SWITCH_BUCKETS_SECONDS = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
]  # fmt: skip
# One analysis: a few ms for a short text on a tiny model up to minutes for 20k tokens.
ANALYZE_BUCKETS_SECONDS = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]

# `prefetch`: from the host tier, put there by a predictive prefetch (replica/prefetch.py).
SWITCH_KINDS = ("hit", "host", "prefetch", "disk", "first")
LOAD_SOURCES = ("disk", "host")
# Memory gauge kind -> key of the status `memory` dict (DESIGN §Response shapes).
MEMORY_KINDS = {
    "base": "base_bytes",
    "lenses": "lens_bytes",
    "donors": "donor_bytes",
    "allocated": "allocated_bytes",
    "free": "free_bytes",
    "total": "total_bytes",
}
FAILURE_REASONS = {
    "corrupt_checkpoint": "corrupt",
    "checkpoint_refused": "corrupt",
    "incompatible_lens": "incompatible",
    "missing_checkpoint": "missing",
    "base_unavailable": "missing",  # a donor directory that cannot be loaded
    "out_of_memory": "oom",
}


class ReplicaMetrics:
    """The metrics a group replica emits, tagged with its `group`."""

    def __init__(self, group_id: str) -> None:
        self.switch_seconds = Histogram(
            "lens_switch_seconds",
            description="Request reaching the replica to its lens being ready: lock wait, "
            "eviction and load. kind: hit, host, prefetch, disk, first.",
            boundaries=SWITCH_BUCKETS_SECONDS,
            tag_keys=("group", "kind"),
        )
        self.load_seconds = Histogram(
            "lens_load_seconds",
            description="One lens load onto the device, by source (disk or host).",
            boundaries=SWITCH_BUCKETS_SECONDS,
            tag_keys=("group", "source"),
        )
        self.base_load_seconds = Histogram(
            "lens_base_load_seconds",
            description="Base model load at replica start.",
            boundaries=SWITCH_BUCKETS_SECONDS,
            tag_keys=("group",),
        )
        self.donor_load_seconds = Histogram(
            "lens_donor_load_seconds",
            description="Donor model load at its first use on a replica.",
            boundaries=SWITCH_BUCKETS_SECONDS,
            tag_keys=("group",),
        )
        self.resident_lenses = Gauge(
            "lens_resident_lenses",
            description="Lenses held by this replica per tier (device, host).",
            tag_keys=("group", "tier"),
        )
        self.device_memory_bytes = Gauge(
            "lens_device_memory_bytes",
            description="Replica memory by kind: base, lenses, donors (accounted tensor "
            "bytes), allocated, free, total (CUDA allocator on GPU, process RSS on CPU).",
            tag_keys=("group", "kind"),
        )
        self.load_failures = Counter(
            "lens_load_failures",
            description="Lens loads that failed, by reason: corrupt, incompatible, missing, oom.",
            tag_keys=("group", "reason", "lens"),
        )
        self.analyze_seconds = Histogram(
            "lens_analyze_seconds",
            description="One analysis (or generation) on a replica, lens ready to result.",
            boundaries=ANALYZE_BUCKETS_SECONDS,
            tag_keys=("group",),
        )
        self.analyzed_tokens = Counter(
            "lens_analyzed_tokens",
            description="Tokens analysed (result rows).",
            tag_keys=("group",),
        )
        self.activation_cache_lookups = Counter(
            "lens_activation_cache_lookups",
            description="Activation cache lookups by result: hit (no base or donor forward "
            "for that text and layer) or miss.",
            tag_keys=("group", "result"),
        )
        for metric in (
            self.switch_seconds,
            self.load_seconds,
            self.base_load_seconds,
            self.donor_load_seconds,
            self.resident_lenses,
            self.device_memory_bytes,
            self.load_failures,
            self.analyze_seconds,
            self.analyzed_tokens,
            self.activation_cache_lookups,
        ):
            metric.set_default_tags({"group": group_id})

    def record_switch(self, kind: str, seconds: float) -> None:
        """Count one request's switch (`kind` in SWITCH_KINDS)."""
        self.switch_seconds.observe(seconds, tags={"kind": kind})

    def record_load(self, source: str, seconds: float) -> None:
        """Count one lens load from `source` (disk, host; a prefetched lens counts as host)."""
        source = "host" if source == "prefetch" else source
        self.load_seconds.observe(seconds, tags={"source": source})

    def record_failure(self, code: str, lens_id: str) -> None:
        """Count a failed lens load; `code` is the LensError code."""
        reason = FAILURE_REASONS.get(code, "corrupt")
        self.load_failures.inc(1, tags={"reason": reason, "lens": lens_id})

    def record_residency(self, device: int, host: int) -> None:
        """Set the per-tier lens counts."""
        self.resident_lenses.set(device, tags={"tier": "device"})
        self.resident_lenses.set(host, tags={"tier": "host"})

    def record_memory(self, memory_bytes: dict[str, int]) -> None:
        """Set the memory gauges from a status `memory` dict (`<kind>_bytes` keys)."""
        for kind, key in MEMORY_KINDS.items():
            if key in memory_bytes:
                self.device_memory_bytes.set(memory_bytes[key], tags={"kind": kind})

    def record_activation_lookups(self, hits: int, misses: int) -> None:
        """Count activation cache lookups by result."""
        for result, count in (("hit", hits), ("miss", misses)):
            if count:
                self.activation_cache_lookups.inc(count, tags={"result": result})

    def record_analysis(self, seconds: float, tokens: int) -> None:
        """Count one finished analysis and its tokens."""
        self.analyze_seconds.observe(seconds)
        if tokens:
            self.analyzed_tokens.inc(tokens)


class IngressMetrics:
    """The metrics the ingress (router) emits: requests and cold starts."""

    def __init__(self) -> None:
        self.requests = Counter(
            "lens_requests",
            description="Requests by group, endpoint and HTTP status.",
            tag_keys=("group", "endpoint", "status"),
        )
        self.cold_start_seconds = Histogram(
            "lens_cold_start_seconds",
            description="At the router: wait for a group that had no running replica "
            "(the cross-group switch).",
            boundaries=SWITCH_BUCKETS_SECONDS,
            tag_keys=("group",),
        )
        # The start-up check's failures, counted once per ingress replica start (the
        # replicas count the loads that fail later).
        self.load_failures = Counter(
            "lens_load_failures",
            description="Lens loads that failed, by reason: corrupt, incompatible, missing, oom.",
            tag_keys=("group", "reason", "lens"),
        )

    def record_failure(self, group_id: str, code: str, lens_id: str) -> None:
        """Count a lens that failed its start-up check; `code` is the LensError code."""
        reason = FAILURE_REASONS.get(code, "corrupt")
        self.load_failures.inc(1, tags={"group": group_id, "reason": reason, "lens": lens_id})

    def record_request(self, group_id: str, endpoint: str, status: int) -> None:
        """Count one request (`group_id` may be "" for routes without a group)."""
        self.requests.inc(1, tags={"group": group_id, "endpoint": endpoint, "status": str(status)})

    def record_cold_start(self, group_id: str, seconds: float) -> None:
        """Record a wait for a group with no running replica."""
        self.cold_start_seconds.observe(seconds, tags={"group": group_id})


class RouterMetrics:
    """Metrics of the router process: Ray-exported ones, and `GET /metrics`'s own registry."""

    def __init__(self) -> None:
        self.ray = IngressMetrics()
        # A registry per app rather than prometheus_client's global one (no module state).
        self.registry = CollectorRegistry()
        PromProcessCollector(registry=self.registry)
        self.requests = PromCounter(
            "lens_router_requests",
            "Requests the router answered, by route and HTTP status.",
            ("endpoint", "status"),
            registry=self.registry,
        )
        self.cold_start_seconds = PromHistogram(
            "lens_cold_start_seconds",
            "Wait for a group that had no running replica (the cross-group switch).",
            ("group",),
            buckets=SWITCH_BUCKETS_SECONDS,
            registry=self.registry,
        )

    def record_request(self, group_id: str, endpoint: str, status: int) -> None:
        """Count one answered request in both exports."""
        self.ray.record_request(group_id, endpoint, status)
        self.requests.labels(endpoint, str(status)).inc()

    def record_cold_start(self, group_id: str, seconds: float) -> None:
        """Record one wait for a group with no running replica."""
        self.ray.record_cold_start(group_id, seconds)
        self.cold_start_seconds.labels(group_id).observe(seconds)
