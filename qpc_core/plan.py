"""The scaling guide's Capacity Planning Worksheet as code (``qpc plan``).

The guide's formulas, computed exactly as written::

    Storage per day     = (users * msgs/hr * 24 * avg_msg_size) + (blob_uploads * avg_blob_size)
    DB growth per month = storage_per_day * 30
    Memory estimate     = (concurrent_users * 5 KB) + 256 MB base
    CPU estimate        = 1 vCPU per ~2,500 concurrent connections (depends on message rate)

Units are decimal, as in the guide's own arithmetic ("10,000 * 5 KB = ~50 MB"): KB = 1,000 B,
MB = 1,000,000 B.  The CPU estimate is rounded up to whole vCPUs (at least 1).  qpc adds
the data kept at the retention period (``storage_per_day * retention_days``) and the
message rate.

When benchmark results exist (``bench/results/summary.json`` written by ``make bench``, in
the working directory or in the source checkout), the estimate from qpc's own measurements
is printed too: measured memory per connection and server CPU seconds per message.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from qpc_core.errors import QpcError

KB = 1000
MB = 1000 * KB
GB = 1000 * MB
TB = 1000 * GB
BASE_MEMORY = 256 * MB
PER_CONNECTION = 5 * KB
CONNECTIONS_PER_VCPU = 2500
DAYS_PER_MONTH = 30
CPU_WARNING = 0.70  # the guide's "CPU usage > 70% sustained" warning threshold
SUMMARY = Path("bench") / "results" / "summary.json"


#: Largest accepted input, per option: far beyond any deployment, small enough that every
#: result stays a finite number (JSON has no Infinity).
LIMITS: dict[str, float] = {
    "users": 1e9,
    "msgs_per_hour": 1e6,
    "msg_size": 1e9,  # bytes
    "blob_uploads_per_day": 1e12,
    "blob_size_mb": 1e6,  # 1 TB
    "retention_days": 36500,  # 100 years
}


class PlanError(QpcError):
    """A worksheet value is missing or out of range (the message names the option)."""


def _number(name: str, value: Any, *, integer: bool = False, positive: bool = False) -> float:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PlanError(f"{flag}: expected a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise PlanError(f"{flag}: expected a finite number, got {value}")
    limit = LIMITS.get(name)
    if limit is not None and value > limit:  # before float(): a huge int would overflow
        try:
            shown = f"{value:g}"
        except OverflowError:  # an int beyond float range
            shown = f"a {len(str(value))}-digit number"
        raise PlanError(f"{flag}: must be at most {limit:,.0f}, got {shown}")
    if integer and value != int(value):
        raise PlanError(f"{flag}: expected a whole number, got {value}")
    if positive and value <= 0:
        raise PlanError(f"{flag}: must be greater than 0, got {value:g}")
    if value < 0:
        raise PlanError(f"{flag}: must not be negative, got {value:g}")
    return float(value)


def plan(
    *,
    users: int,
    msgs_per_hour: float,
    msg_size: float,
    blob_uploads_per_day: float = 0,
    blob_size_mb: float = 0,
    retention_days: float = 30,
    measured: dict[str, Any] | None = None,
    use_bench_results: bool = True,
) -> dict[str, Any]:
    """The worksheet for these inputs (bytes, vCPUs); raises :class:`PlanError`.

    ``measured`` overrides the benchmark summary; ``use_bench_results=False`` skips it."""
    n_users = int(_number("users", users, integer=True, positive=True))
    per_hour = _number("msgs_per_hour", msgs_per_hour)
    size = _number("msg_size", msg_size)
    blobs = _number("blob_uploads_per_day", blob_uploads_per_day)
    blob_mb = _number("blob_size_mb", blob_size_mb)
    retention = _number("retention_days", retention_days)

    msg_bytes_day = n_users * per_hour * 24 * size
    blob_bytes_day = blobs * blob_mb * MB
    storage_day = msg_bytes_day + blob_bytes_day
    msgs_per_sec = n_users * per_hour / 3600.0
    out: dict[str, Any] = {
        "inputs": {"users": n_users, "msgs_per_hour": per_hour, "msg_size": size,
                   "blob_uploads_per_day": blobs, "blob_size_mb": blob_mb,
                   "retention_days": retention},
        "message_bytes_per_day": msg_bytes_day,
        "blob_bytes_per_day": blob_bytes_day,
        "storage_per_day_bytes": storage_day,
        "db_growth_per_month_bytes": storage_day * DAYS_PER_MONTH,
        "retained_bytes": storage_day * retention,
        "memory_bytes": n_users * PER_CONNECTION + BASE_MEMORY,
        "vcpus": max(1, math.ceil(n_users / CONNECTIONS_PER_VCPU)),
        "messages_per_second": msgs_per_sec,
    }
    if measured is None and use_bench_results:
        measured = load_measured()
    if measured:
        est = measured_estimate(measured, n_users, msgs_per_sec)
        if est:
            out["measured"] = est
    _check_finite(out)
    return out


def _check_finite(result: dict[str, Any], where: str = "") -> None:
    """Every number of the plan is finite (e.g. absurd benchmark figures could overflow)."""
    for k, v in result.items():
        if isinstance(v, dict):
            _check_finite(v, f"{where}{k}.")
        elif isinstance(v, float) and not math.isfinite(v):
            raise PlanError(f"the inputs are too large: {where}{k} is not a finite number")


def measured_estimate(measured: dict[str, Any], users: int, msgs_per_sec: float) -> dict[str, Any]:
    """The estimate from benchmark figures (only the figures that are present and valid)."""
    est: dict[str, Any] = {"source": str(measured.get("source", SUMMARY))}
    per_conn = _positive(measured.get("memory_per_connection_bytes"))
    cpu_per_msg = _positive(measured.get("server_cpu_seconds_per_message"))
    if per_conn is not None:
        est["memory_per_connection_bytes"] = per_conn
        est["memory_bytes"] = users * per_conn + BASE_MEMORY
    if cpu_per_msg is not None:
        busy = msgs_per_sec * cpu_per_msg
        est["server_cpu_seconds_per_message"] = cpu_per_msg
        est["vcpus_for_messages"] = busy
        # Whole vCPUs keeping message handling under the guide's 70% CPU warning.
        est["vcpus_below_warning"] = max(1, math.ceil(busy / CPU_WARNING))
    return est if len(est) > 1 else {}


def _positive(v: Any) -> float | None:
    """``v`` as a float when it is a finite positive number (JSON figures may be null)."""
    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
        return float(v)
    return None


def summary_candidates() -> list[Path]:
    """Where ``make bench`` results are looked for: the working directory, then the checkout."""
    checkout = Path(__file__).resolve().parent.parent / SUMMARY
    cands = [Path.cwd() / SUMMARY]
    if checkout != cands[0]:
        cands.append(checkout)
    return cands


def load_measured(path: Path | None = None) -> dict[str, Any] | None:
    """The benchmark summary as a dict, or ``None`` when there is none (or it is unreadable)."""
    for p in [path] if path is not None else summary_candidates():
        if not p.is_file():
            continue
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        data.setdefault("source", str(p))
        return data
    return None


def human(n: float) -> str:
    """Decimal units, like the guide: 2,474,560,000 → '2.47 GB'."""
    for unit, size in (("TB", TB), ("GB", GB), ("MB", MB), ("KB", KB)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def format_plan(p: dict[str, Any]) -> str:
    i = p["inputs"]
    lines = [
        "Capacity plan (scaling guide worksheet; KB = 1,000 B, MB = 1,000,000 B)",
        f"  inputs: {i['users']:,} concurrent users, {i['msgs_per_hour']:g} msgs/user/hour of "
        f"{i['msg_size']:g} B, {i['blob_uploads_per_day']:g} blob uploads/day of "
        f"{i['blob_size_mb']:g} MB, {i['retention_days']:g} days retention",
        f"  storage per day      {human(p['storage_per_day_bytes'])} "
        f"(messages {human(p['message_bytes_per_day'])} + blobs {human(p['blob_bytes_per_day'])})",
        f"  DB growth per month  {human(p['db_growth_per_month_bytes'])}",
        f"  retained data        {human(p['retained_bytes'])} "
        f"({i['retention_days']:g} days)",
        f"  memory estimate      {human(p['memory_bytes'])} (5 KB per user + 256 MB base)",
        f"  CPU estimate         {p['vcpus']} vCPU (1 per 2,500 concurrent connections)",
        f"  message rate         {p['messages_per_second']:,.1f} msg/s",
    ]
    m = p.get("measured")
    if m:
        lines.append(f"From qpc's own benchmark ({m['source']}):")
        if "memory_bytes" in m:
            lines.append(f"  memory estimate      {human(m['memory_bytes'])} "
                         f"({human(m['memory_per_connection_bytes'])} per connection measured "
                         "+ 256 MB base)")
        if "vcpus_for_messages" in m:
            lines.append(f"  CPU for messages     {m['vcpus_for_messages']:.2f} vCPU busy "
                         f"({m['server_cpu_seconds_per_message'] * 1e6:,.0f} us/message "
                         f"measured); {m['vcpus_below_warning']} vCPU stay under the 70% "
                         "CPU warning")
    return "\n".join(lines)


# -- command line (`qpc plan`; also `python -m qpc_core.plan`) -----------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The worksheet options.  Values are parsed by :func:`run`, so bad input is exit 1."""
    p.add_argument("--users", required=True, metavar="N", help="expected concurrent users")
    p.add_argument("--msgs-per-hour", required=True, metavar="M",
                   help="messages per user per hour")
    p.add_argument("--msg-size", required=True, metavar="B", help="average message size (bytes)")
    p.add_argument("--blob-uploads-per-day", default="0", metavar="U")
    p.add_argument("--blob-size-mb", default="0", metavar="S", help="average blob size (MB)")
    p.add_argument("--retention-days", default="30", metavar="D")
    p.add_argument("--bench-results", type=Path, default=None, metavar="FILE",
                   help="benchmark summary.json (default: bench/results/summary.json)")
    p.add_argument("--no-bench", action="store_true", help="ignore benchmark results")
    p.add_argument("--json", action="store_true")


def _parse(name: str, raw: Any, integer: bool = False) -> float:
    if isinstance(raw, int | float):
        return raw
    flag = "--" + name.replace("_", "-")
    try:
        return int(raw) if integer else float(raw)
    except (TypeError, ValueError):
        kind = "a whole number" if integer else "a number"
        raise PlanError(f"{flag}: expected {kind}, got {raw!r}") from None


def run(args: argparse.Namespace) -> int:
    """Compute and print the plan; raises :class:`PlanError` on bad input."""
    measured = None
    use_bench = not getattr(args, "no_bench", False)
    bench = getattr(args, "bench_results", None)
    if bench is not None and use_bench:
        measured = load_measured(bench)
        if measured is None:
            raise PlanError(f"--bench-results: cannot read benchmark summary {bench}")
    result = plan(
        users=int(_parse("users", args.users, integer=True)),
        msgs_per_hour=_parse("msgs_per_hour", args.msgs_per_hour),
        msg_size=_parse("msg_size", args.msg_size),
        blob_uploads_per_day=_parse("blob_uploads_per_day", args.blob_uploads_per_day),
        blob_size_mb=_parse("blob_size_mb", args.blob_size_mb),
        retention_days=_parse("retention_days", args.retention_days),
        measured=measured,
        use_bench_results=use_bench,
    )
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qpc plan",
                                     description="capacity planning worksheet (scaling guide)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except PlanError as e:
        print(f"qpc: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
