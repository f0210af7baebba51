"""The ``[metrics]`` config table."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class MetricsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # delivery_queue_depth follows enqueue/fetch events between resyncs; Ack, expiry and
    # account deletion remove messages without an event, so the gauge is re-read from the
    # storage (one SUM over the inboxes table) this often.
    queue_depth_resync_secs: float = Field(default=15.0, gt=0)
    # Process CPU, memory and open files (process_* metrics) for this server process.
    process_metrics: bool = True
