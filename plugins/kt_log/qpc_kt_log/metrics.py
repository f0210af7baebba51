"""Prometheus metrics of the key-transparency log, on the admin app's ``/metrics``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from qpc_kt_log.service import KtLogService


class KtCollector:
    def __init__(self, svc: KtLogService) -> None:
        self.svc = svc

    def collect(self) -> Iterator[Metric]:
        svc = self.svc
        yield GaugeMetricFamily("kt_log_leaves",
                                "Leaves of the key-transparency log this server holds",
                                value=svc.tree.size)
        head = svc.head
        if head is not None:
            yield GaugeMetricFamily(
                "kt_log_head_timestamp_seconds",
                "Signing time of the newest stored signed tree head this server knows (unix "
                "seconds; heads are signed when the tree grew or the head aged, as read)",
                value=head.timestamp_ms / 1000)
        yield CounterMetricFamily("kt_log_appended_leaves_total",
                                  "Leaves this server appended to the log",
                                  value=svc.stats.appended)
        yield CounterMetricFamily(
            "kt_log_append_conflicts_total",
            "Appends this server built for a size another server had already appended at "
            "(nothing written; checked and tried again)", value=svc.stats.conflicts)
        yield CounterMetricFamily(
            "kt_log_head_store_failures_total",
            "New signed heads the store refused (the newest stored head was served instead)",
            value=svc.stats.head_store_failures)
        yield GaugeMetricFamily(
            "kt_log_refused",
            "1 when this server refuses the stored log or heads (rewritten or truncated: no "
            "appends, no new heads, ResolveUser fails closed)",
            value=1.0 if svc.refused else 0.0)
