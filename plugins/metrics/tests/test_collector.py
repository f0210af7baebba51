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
