"""The collector's building blocks, without a server."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from qpc_metrics.collector import (
    HANDSHAKE_BUCKETS,
    METRICS,
    STORAGE_BUCKETS,
    BoundedLabel,
    Histogram,
    QpcMetrics,
)

from qpc_core.framing import Status


def test_histogram_buckets_are_cumulative_and_le_inclusive() -> None:
    h = Histogram((0.1, 0.5))
    for v in (0.05, 0.1, 0.2, 0.5, 3.0):
        h.observe(v)
    assert h.cumulative() == [("0.1", 2.0), ("0.5", 4.0), ("+Inf", 5.0)]
    assert h.count == 5 and h.sum == 0.05 + 0.1 + 0.2 + 0.5 + 3.0


def test_bucket_bounds_include_the_guide_thresholds() -> None:
    assert {0.1, 0.5} <= set(HANDSHAKE_BUCKETS)  # TLS handshake p95: 100 ms / 500 ms
    assert {0.005, 0.02} <= set(STORAGE_BUCKETS)  # disk I/O p95: 5 ms / 20 ms


def test_bounded_label_caps_distinct_values() -> None:
    label = BoundedLabel(limit=2)
    assert [label(v) for v in ("a", "b", "c", "a", "d")] == ["a", "b", "other", "a", "other"]


def test_storage_operations_beyond_the_cap_share_other() -> None:
    m = QpcMetrics(version="1", in_flight=lambda: 0, connections=lambda: 0,
                   max_connections=lambda: 1)
    for i in range(40):
        m.storage_operation(f"op{i}", 0.001)
    assert len(m.storage) == 16 + 1 and m.storage["other"].count == 24


def test_exposition_names_and_zero_start() -> None:
    m = QpcMetrics(version="9.9", in_flight=lambda: 3, connections=lambda: 2,
                   max_connections=lambda: 100)
    m.rpc_completed("Fetch", Status.OK, 0.01)
    m.rpc_completed("Fetch", Status.RATE_LIMITED, 0.001)
    m.rpc_completed("Nope", 250, 0.001)  # a status outside the enum keeps the label bounded
    reg = CollectorRegistry()
    reg.register(m)
    text = generate_latest(reg).decode()
    for doc in METRICS:
        assert f"# HELP {doc.name} " in text and f"# TYPE {doc.name} {doc.kind}" in text
    assert "\nenqueue_total 0.0\n" in text
    assert "\nserver_in_flight_rpcs 3.0\n" in text
    assert "\nfetch_total 1.0\n" in text  # only the OK one counts as a fetch
    assert 'rpc_requests_total{method="Fetch",status="RATE_LIMITED"} 1.0' in text
    assert 'rpc_requests_total{method="Nope",status="other"} 1.0' in text
    assert "_created" not in text


def test_readme_lists_every_metric_with_its_help() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for doc in METRICS:
        labels = ", ".join(f"`{label}`" for label in doc.labels)
        assert f"| `{doc.name}` | {doc.kind} | {labels} | {doc.help} |" in readme, doc.name


def _depth_sample(m: QpcMetrics) -> str:
    reg = CollectorRegistry()
    reg.register(m)
    line = [ln for ln in generate_latest(reg).decode().splitlines()
            if ln.startswith("delivery_queue_depth ")]
    assert len(line) == 1
    return line[0]


def test_queue_depth_survives_fetched_before_enqueued() -> None:
    """A message handed straight to a parked FetchWait is reported fetched before it is
    reported enqueued: the pair must cancel out, not leave the gauge one too high."""
    m = QpcMetrics(version="1", in_flight=lambda: 0, connections=lambda: 0,
                   max_connections=lambda: 1)
    for _ in range(200):  # a load test's worth of hand-overs, all in the reversed order
        m.messages_fetched("fetch_wait", 1, 10)
        assert m.queue_depth == 0  # exposed value clamped while the running value is -1
        assert _depth_sample(m) == "delivery_queue_depth 0.0"
        m.message_enqueued(10, duplicate=False)
    assert m.queue_depth == 0
    assert _depth_sample(m) == "delivery_queue_depth 0.0"
    # Ordinary order, a peek (removes nothing) and a resync still behave as before.
    m.message_enqueued(5, duplicate=False)
    m.message_enqueued(5, duplicate=False)
    m.messages_fetched("peek", 2, 10)
    assert m.queue_depth == 2
    m.messages_fetched("fetch", 1, 5)
    assert m.queue_depth == 1
    m.queue_depth = 7  # the resync from storage replaces the running value
    assert _depth_sample(m) == "delivery_queue_depth 7.0"
    m.messages_fetched("fetch", 9, 45)  # more than it knew of (e.g. events before a resync)
    assert _depth_sample(m) == "delivery_queue_depth 0.0"
