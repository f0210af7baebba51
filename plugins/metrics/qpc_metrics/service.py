"""Per-App metrics state: the collector, its registration and the queue-depth resync.

``delivery_queue_depth`` is kept cheap: enqueue events add one, Fetch/FetchWait events
subtract what they removed, and every ``queue_depth_resync_secs`` (and at start-up, and on
``POST /p/metrics/resync``) the value is replaced by ``storage.total_queue_depth()``.  The
resync corrects what no event reports (Ack, TTL expiry, account deletion, an operator's
manual delete).  Events racing a resync read can be off by the few messages committed
during that read, until the next resync.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from prometheus_client import ProcessCollector

from qpc_core.admin import metrics_registry
from qpc_metrics.collector import QpcMetrics
from qpc_metrics.config import MetricsConfig

if TYPE_CHECKING:
    from qpc_core.app import App

log = logging.getLogger("qpc.metrics")


class MetricsService:
    def __init__(self, app: App, cfg: MetricsConfig) -> None:
        self.app = app
        self.cfg = cfg
        self.metrics = QpcMetrics(
            version=app.version,
            in_flight=lambda: app.in_flight,
            connections=lambda: len(app.connections),
            max_connections=lambda: app.settings.max_connections,
        )

    def register(self) -> None:
        registry = metrics_registry(self.app)
        registry.register(self.metrics)
        if self.cfg.process_metrics:
            ProcessCollector(registry=registry)

    async def resync(self) -> int | None:
        """Re-read delivery_queue_depth from storage; the new value, or None on failure."""
        try:
            depth = await self.app.storage.total_queue_depth()
        except Exception as e:
            log.warning("delivery_queue_depth resync failed (keeping %d): %s",
                        self.metrics.queue_depth, e)
            return None
        self.metrics.queue_depth = depth
        return depth

    async def resync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.queue_depth_resync_secs)
            await self.resync()
