"""The metrics qpc exposes on ``/metrics``, kept as plain numbers and rendered at scrape time.

Hooks update integers and fixed-bucket histograms (O(1), no locks: every hook runs on the
event-loop thread, and so does the scrape).  :meth:`QpcMetrics.collect` turns them into
Prometheus metric families for a per-App ``CollectorRegistry``.  Custom families (instead of
``prometheus_client.Counter``) keep the exposed names exact: ``enqueue_total`` and nothing
else, no ``enqueue_created`` side series.

Label sets are bounded: RPC ``method`` is a registered method name or ``unknown``,
``status`` a :class:`~qpc_core.framing.Status` name, storage ``operation`` the first
:data:`MAX_LABEL_VALUES` names a backend reports (then ``other``).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from qpc_core.framing import Status

MAX_LABEL_VALUES = 16
OTHER = "other"

# Bucket bounds include the scaling guide's alert thresholds exactly, so histogram_quantile
# is exact at the boundary: handshake p95 100 ms / 500 ms, disk I/O p95 5 ms / 20 ms.
HANDSHAKE_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
RPC_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
STORAGE_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
)


@dataclass(frozen=True, slots=True)
class MetricDoc:
    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = ()


# Every metric family this plugin exposes (README and tests are checked against this list).
METRICS: tuple[MetricDoc, ...] = (
    # -- the names the scaling guide and REFERENCE §10 use ------------------------------------
    MetricDoc("enqueue_total", "counter",
              "Messages committed to a delivery queue by Enqueue or BatchEnqueue (one per "
              "recipient; dedup hits are counted in enqueue_duplicate_total instead)."),
    MetricDoc("enqueue_bytes_total", "counter",
              "Payload bytes of the messages counted in enqueue_total."),
    MetricDoc("fetch_total", "counter", "Fetch calls answered successfully."),
    MetricDoc("fetch_wait_total", "counter",
              "FetchWait (long-poll) calls answered successfully, with or without messages."),
    MetricDoc("key_package_upload_total", "counter", "MLS key packages uploaded and stored."),
    MetricDoc("auth_login_success_total", "counter", "Logins that completed (e.g. OPAQUE)."),
    MetricDoc("auth_login_failure_total", "counter",
              "Logins that failed: wrong password, unknown user, throttled, bad proof."),
    MetricDoc("rate_limit_hit_total", "counter",
              "Calls refused by a rate limiter (per-identity, per-IP or login throttle)."),
    MetricDoc("delivery_queue_depth", "gauge",
              "Messages stored in all delivery queues, waiting to be fetched."),
    MetricDoc("server_in_flight_rpcs", "gauge", "RPCs being handled right now."),
    # -- what the guide's scaling triggers need --------------------------------------------------
    MetricDoc("server_active_connections", "gauge",
              "Client connections open now (QUIC, handshake completed)."),
    MetricDoc("server_max_connections", "gauge",
              "Configured connection limit (max_connections); new connections beyond it are "
              "refused."),
    MetricDoc("server_connections_opened_total", "counter",
              "Client connections accepted since start."),
    MetricDoc("tls_handshake_duration_seconds", "histogram",
              "QUIC/TLS handshake time, from the client's first packet to handshake completion."),
    MetricDoc("rpc_requests_total", "counter",
              "RPCs answered, by method name and response status.", ("method", "status")),
    MetricDoc("rpc_duration_seconds", "histogram",
              "Time to answer an RPC, by method name (FetchWait includes its wait).",
              ("method",)),
    MetricDoc("storage_operation_duration_seconds", "histogram",
              "Storage latency by operation: commit = one group-commit transaction "
              "(disk writes), read = one read query.", ("operation",)),
    MetricDoc("enqueue_duplicate_total", "counter",
              "Enqueues answered from the dedup window (same message_id), not stored again."),
    MetricDoc("fetched_messages_total", "counter",
              "Messages handed to recipients, by call (fetch, fetch_wait, peek).", ("method",)),
    MetricDoc("fetched_bytes_total", "counter",
              "Payload bytes of the messages counted in fetched_messages_total.", ("method",)),
    MetricDoc("qpc_info", "gauge", "Always 1; the labels carry the server version.",
              ("version",)),
    MetricDoc("tls_certificate_expiry_timestamp_seconds", "gauge",
              "When the certificate a listener serves to new connections expires (unix "
              "seconds), by listener; follows certificate reloads (SIGHUP).", ("listener",)),
    MetricDoc("tls_reloads_total", "counter",
              "Certificate reloads (SIGHUP) by listener and result (ok, or error: the old "
              "certificate stays in use).", ("listener", "result")),
    MetricDoc("config_reloads_total", "counter",
              "Configuration reloads (SIGHUP) by result (ok, or error: the file was refused "
              "and the running configuration stays).", ("result",)),
    MetricDoc("config_last_reload_successful", "gauge",
              "1 when the last configuration reload was taken (or none was tried), 0 when it "
              "was refused."),
    MetricDoc("config_restart_pending_settings", "gauge",
              "Settings whose configured value differs from the running one until a "
              "restart (they do not apply while running)."),
)
DOCS = {m.name: m for m in METRICS}
FETCH_METHODS = ("fetch", "fetch_wait", "peek")
# Prometheus' own bucket-bound formatting ("0.005", "1.0", "+Inf").
_le: Callable[[float], str] = floatToGoString


class Histogram:
    """Fixed-bucket histogram: counts per bucket (non-cumulative), sum and count."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # last slot: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le = "less or equal").
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        acc = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            acc += n
            out.append((_le(bound), float(acc)))
        return out


class BoundedLabel:
    """Maps free-form values onto at most ``limit`` label values (the rest: ``other``)."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) < self.limit:
            self.seen.add(value)
            return value
        return OTHER


def status_name(status: int) -> str:
    try:
        return Status(status).name
    except ValueError:
        return OTHER


class QpcMetrics:
    """Counters and histograms of one App; ``collect`` renders them (a prometheus Collector)."""

    def __init__(
        self,
        *,
        version: str,
        in_flight: Callable[[], int],
        connections: Callable[[], int],
        max_connections: Callable[[], int],
    ) -> None:
        self.version = version
        self._in_flight = in_flight
        self._connections = connections
        self._max_connections = max_connections
        self.enqueue = 0
        self.enqueue_bytes = 0
        self.enqueue_duplicate = 0
        self.fetch = 0
        self.fetch_wait = 0
        self.key_package_upload = 0
        self.login_success = 0
        self.login_failure = 0
        self.rate_limit_hit = 0
        self.connections_opened = 0
        # Unclamped running value: events may arrive out of order (a message handed straight
        # to a waiting FetchWait is reported fetched before it is reported enqueued), so it
        # may dip below 0 for a moment; only the exposed value is clamped.
        self._queue_depth = 0
        self.fetched_messages = dict.fromkeys(FETCH_METHODS, 0)
        self.fetched_bytes = dict.fromkeys(FETCH_METHODS, 0)
        self.handshake = Histogram(HANDSHAKE_BUCKETS)
        self.rpc_count: dict[tuple[str, str], int] = {}
        self.rpc_duration: dict[str, Histogram] = {}
        self.storage: dict[str, Histogram] = {}
        self._operation = BoundedLabel()
        self.cert_expiry: dict[str, float] = {}  # listener -> not-after (unix seconds)
        self.tls_reloads: dict[tuple[str, str], int] = {}  # (listener, result) -> count
        self.config_reloads: dict[str, int] = {}  # result -> count
        self.config_last_ok = True
        self.config_restart_pending = 0

    @property
    def queue_depth(self) -> int:
        """``delivery_queue_depth`` as exposed: the running value, never below 0."""
        return max(0, self._queue_depth)

    @queue_depth.setter
    def queue_depth(self, value: int) -> None:
        """Replace the running value (the resync from storage)."""
        self._queue_depth = value

    # -- updates (called from the on_* hooks) --------------------------------------------------
    def message_enqueued(self, size: int, duplicate: bool) -> None:
        if duplicate:
            self.enqueue_duplicate += 1
            return
        self.enqueue += 1
        self.enqueue_bytes += size
        self._queue_depth += 1

    def messages_fetched(self, method: str, count: int, size: int) -> None:
        key = method if method in self.fetched_messages else OTHER
        self.fetched_messages[key] = self.fetched_messages.get(key, 0) + count
        self.fetched_bytes[key] = self.fetched_bytes.get(key, 0) + size
        if method != "peek":  # fetch and fetch_wait remove what they return
            self._queue_depth -= count  # not clamped here: see __init__

    def rpc_completed(self, method: str, status: int, seconds: float) -> None:
        key = (method, status_name(status))
        self.rpc_count[key] = self.rpc_count.get(key, 0) + 1
        h = self.rpc_duration.get(method)
        if h is None:
            h = self.rpc_duration[method] = Histogram(RPC_BUCKETS)
        h.observe(seconds)
        if status == Status.OK:
            if method == "Fetch":
                self.fetch += 1
            elif method == "FetchWait":
                self.fetch_wait += 1

    def tls_certificate(self, listener: str, not_after: float) -> None:
        self.cert_expiry[listener] = not_after

    def tls_reload(self, listener: str, ok: bool) -> None:
        key = (listener, "ok" if ok else "error")
        self.tls_reloads[key] = self.tls_reloads.get(key, 0) + 1

    def config_reload(self, ok: bool, restart_pending: int) -> None:
        key = "ok" if ok else "error"
        self.config_reloads[key] = self.config_reloads.get(key, 0) + 1
        self.config_last_ok = ok
        self.config_restart_pending = restart_pending

    def storage_operation(self, operation: str, seconds: float) -> None:
        op = self._operation(operation)
        h = self.storage.get(op)
        if h is None:
            h = self.storage[op] = Histogram(STORAGE_BUCKETS)
        h.observe(seconds)

    # -- exposition -------------------------------------------------------------------------------
    def _counter(self, name: str, value: float) -> CounterMetricFamily:
        return CounterMetricFamily(name, DOCS[name].help, value=value)

    def _gauge(self, name: str, value: float) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, DOCS[name].help, value=value)

    def collect(self) -> Iterator[Metric]:
        yield self._counter("enqueue_total", self.enqueue)
        yield self._counter("enqueue_bytes_total", self.enqueue_bytes)
        yield self._counter("fetch_total", self.fetch)
        yield self._counter("fetch_wait_total", self.fetch_wait)
        yield self._counter("key_package_upload_total", self.key_package_upload)
        yield self._counter("auth_login_success_total", self.login_success)
        yield self._counter("auth_login_failure_total", self.login_failure)
        yield self._counter("rate_limit_hit_total", self.rate_limit_hit)
        yield self._gauge("delivery_queue_depth", self.queue_depth)
        yield self._gauge("server_in_flight_rpcs", self._in_flight())
        yield self._gauge("server_active_connections", self._connections())
        yield self._gauge("server_max_connections", self._max_connections())
        yield self._counter("server_connections_opened_total", self.connections_opened)
        yield self._counter("enqueue_duplicate_total", self.enqueue_duplicate)

        hs = HistogramMetricFamily("tls_handshake_duration_seconds",
                                   DOCS["tls_handshake_duration_seconds"].help,
                                   buckets=self.handshake.cumulative(),
                                   sum_value=self.handshake.sum)
        yield hs

        rpc = CounterMetricFamily("rpc_requests_total", DOCS["rpc_requests_total"].help,
                                  labels=["method", "status"])
        for (method, status), n in sorted(self.rpc_count.items()):
            rpc.add_metric([method, status], n)
        yield rpc
        yield self._histograms("rpc_duration_seconds", "method", self.rpc_duration)
        yield self._histograms("storage_operation_duration_seconds", "operation", self.storage)

        fm = CounterMetricFamily("fetched_messages_total", DOCS["fetched_messages_total"].help,
                                 labels=["method"])
        fb = CounterMetricFamily("fetched_bytes_total", DOCS["fetched_bytes_total"].help,
                                 labels=["method"])
        for method in sorted(self.fetched_messages):
            fm.add_metric([method], self.fetched_messages[method])
            fb.add_metric([method], self.fetched_bytes[method])
        yield fm
        yield fb

        info = GaugeMetricFamily("qpc_info", DOCS["qpc_info"].help, labels=["version"])
        info.add_metric([self.version], 1)
        yield info

        name = "tls_certificate_expiry_timestamp_seconds"
        expiry = GaugeMetricFamily(name, DOCS[name].help, labels=["listener"])
        for listener, not_after in sorted(self.cert_expiry.items()):
            expiry.add_metric([listener], not_after)
        yield expiry
        reloads = CounterMetricFamily("tls_reloads_total", DOCS["tls_reloads_total"].help,
                                      labels=["listener", "result"])
        for (listener, result), n in sorted(self.tls_reloads.items()):
            reloads.add_metric([listener, result], n)
        yield reloads
        creloads = CounterMetricFamily("config_reloads_total",
                                       DOCS["config_reloads_total"].help, labels=["result"])
        for result, n in sorted(self.config_reloads.items()):
            creloads.add_metric([result], n)
        yield creloads
        name = "config_last_reload_successful"
        yield GaugeMetricFamily(name, DOCS[name].help, value=int(self.config_last_ok))
        name = "config_restart_pending_settings"
        yield GaugeMetricFamily(name, DOCS[name].help, value=self.config_restart_pending)

    @staticmethod
    def _histograms(name: str, label: str, by: dict[str, Histogram]) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(name, DOCS[name].help, labels=[label])
        for value in sorted(by):
            h = by[value]
            fam.add_metric([value], h.cumulative(), h.sum)
        return fam
