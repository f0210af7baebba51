"""The scaling guide's Capacity Planning Worksheet as code (``qpc plan``).

Formulas, from the guide:

    storage/day   = users * msgs/hr * 24 * avg_msg_size + blob_uploads/day * avg_blob_size
    DB growth/mo  = storage/day * 30
    memory        = concurrent_users * 5 KB + 256 MB base
    CPU           = 1 vCPU per ~2,500 concurrent connections

Plus retained data = storage/day * retention days.  When ``bench/results/summary.json``
exists, the measured per-connection memory and CPU per message are shown alongside.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

KB = 1000
MB = 1000 * 1000
GB = 1000 * MB
BASE_MEMORY = 256 * MB
PER_CONNECTION = 5 * KB
CONNECTIONS_PER_VCPU = 2500


def plan(*, users: int, msgs_per_hour: float, msg_size: float, blob_uploads_per_day: float = 0,
         blob_size_mb: float = 0, retention_days: float = 30,
         measured: dict[str, Any] | None = None) -> dict[str, Any]:
    if users < 0 or msgs_per_hour < 0 or msg_size < 0 or blob_uploads_per_day < 0 \
            or blob_size_mb < 0 or retention_days < 0:
        raise ValueError("all worksheet values must be >= 0")
    msg_bytes_day = users * msgs_per_hour * 24 * msg_size
    blob_bytes_day = blob_uploads_per_day * blob_size_mb * MB
    storage_day = msg_bytes_day + blob_bytes_day
    out: dict[str, Any] = {
        "inputs": {"users": users, "msgs_per_hour": msgs_per_hour, "msg_size": msg_size,
                   "blob_uploads_per_day": blob_uploads_per_day, "blob_size_mb": blob_size_mb,
                   "retention_days": retention_days},
        "storage_per_day_bytes": storage_day,
        "db_growth_per_month_bytes": storage_day * 30,
        "retained_bytes": storage_day * retention_days,
        "memory_bytes": users * PER_CONNECTION + BASE_MEMORY,
        "vcpus": max(1, math.ceil(users / CONNECTIONS_PER_VCPU)),
        "messages_per_second": users * msgs_per_hour / 3600.0,
    }
    if measured is None:
        measured = load_measured()
    if measured:
        per_conn = measured.get("memory_per_connection_bytes")
        cpu_per_msg = measured.get("server_cpu_seconds_per_message")
        est: dict[str, Any] = {"source": measured.get("source", "bench/results")}
        if per_conn:
            est["memory_bytes"] = users * per_conn + BASE_MEMORY
        if cpu_per_msg:
            est["vcpus_for_messages"] = out["messages_per_second"] * cpu_per_msg
        out["measured"] = est
    return out


def load_measured(path: Path | None = None) -> dict[str, Any] | None:
    p = path or Path("bench/results/summary.json")
    if not p.is_file():
        return None
    try:
        data: dict[str, Any] = json.loads(p.read_text())
    except ValueError:
        return None
    data.setdefault("source", str(p))
    return data


def _human(n: float) -> str:
    for unit, size in (("GB", GB), ("MB", MB), ("KB", KB)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def format_plan(p: dict[str, Any]) -> str:
    lines = [
        "Capacity plan (scaling guide worksheet)",
        f"  storage per day      {_human(p['storage_per_day_bytes'])}",
        f"  DB growth per month  {_human(p['db_growth_per_month_bytes'])}",
        f"  retained data        {_human(p['retained_bytes'])} "
        f"({p['inputs']['retention_days']:g} days)",
        f"  memory estimate      {_human(p['memory_bytes'])}",
        f"  CPU estimate         {p['vcpus']} vCPU",
        f"  message rate         {p['messages_per_second']:,.1f} msg/s",
    ]
    m = p.get("measured")
    if m:
        lines.append(f"From qpc's own benchmark ({m['source']}):")
        if "memory_bytes" in m:
            lines.append(f"  memory estimate      {_human(m['memory_bytes'])}")
        if "vcpus_for_messages" in m:
            lines.append(f"  CPU for messages     {m['vcpus_for_messages']:.2f} vCPU")
    return "\n".join(lines)
