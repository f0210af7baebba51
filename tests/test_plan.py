"""`qpc plan`: the scaling guide's Capacity Planning Worksheet, checked against numbers
computed by hand from the guide's formulas."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qpc_core.plan import PlanError, load_measured, main, plan
from qpc_core.testing import BIN

# Worked example: 1,000 concurrent users, 60 messages per user per hour of 1,024 bytes,
# 500 blob uploads per day of 2 MB, 30 days retention.  By hand, with the guide's formulas
# (decimal units, as the guide's own "10,000 * 5 KB = ~50 MB"):
#   messages/day  = 1,000 * 60 * 24 * 1,024       = 1,474,560,000 B
#   blobs/day     = 500 * 2 MB = 500 * 2,000,000  = 1,000,000,000 B
#   storage/day   = 1,474,560,000 + 1,000,000,000 = 2,474,560,000 B   (2.47 GB)
#   DB growth/mo  = 2,474,560,000 * 30            = 74,236,800,000 B  (74.24 GB)
#   memory        = 1,000 * 5,000 + 256,000,000   = 261,000,000 B     (261.00 MB)
#   CPU           = ceil(1,000 / 2,500)           = 1 vCPU
#   message rate  = 1,000 * 60 / 3,600            = 16.67 msg/s
EXAMPLE: dict[str, Any] = dict(users=1000, msgs_per_hour=60, msg_size=1024,
                               blob_uploads_per_day=500, blob_size_mb=2, retention_days=30)
EXAMPLE_ARGS = ["--users", "1000", "--msgs-per-hour", "60", "--msg-size", "1024",
                "--blob-uploads-per-day", "500", "--blob-size-mb", "2", "--retention-days", "30"]


def test_worked_example_matches_the_guide_formulas() -> None:
    p = plan(**EXAMPLE, use_bench_results=False)
    assert p["message_bytes_per_day"] == 1_474_560_000
    assert p["blob_bytes_per_day"] == 1_000_000_000
    assert p["storage_per_day_bytes"] == 2_474_560_000
    assert p["db_growth_per_month_bytes"] == 74_236_800_000
    assert p["retained_bytes"] == 74_236_800_000
    assert p["memory_bytes"] == 261_000_000
    assert p["vcpus"] == 1
    assert p["messages_per_second"] == pytest.approx(16.6667, abs=1e-4)
    assert "measured" not in p


def test_guide_memory_example_and_cpu_rounding() -> None:
    # The guide: "10,000 * 5 KB = ~50 MB for connections" (+ 256 MB base); 4 vCPU at 2,500 each.
    p = plan(users=10_000, msgs_per_hour=0, msg_size=0, use_bench_results=False)
    assert p["memory_bytes"] - 256_000_000 == 50_000_000
    assert p["vcpus"] == 4
    assert p["storage_per_day_bytes"] == 0
    assert plan(users=2500, msgs_per_hour=1, msg_size=1, use_bench_results=False)["vcpus"] == 1
    assert plan(users=2501, msgs_per_hour=1, msg_size=1, use_bench_results=False)["vcpus"] == 2
    assert plan(users=1, msgs_per_hour=1, msg_size=1, use_bench_results=False)["vcpus"] == 1
    # Retention changes the retained data, not the guide's 30-day growth figure.
    p7 = plan(**{**EXAMPLE, "retention_days": 7}, use_bench_results=False)
    assert p7["retained_bytes"] == 2_474_560_000 * 7
    assert p7["db_growth_per_month_bytes"] == 74_236_800_000


def test_cli_prints_the_worksheet(tmp_path: Path) -> None:
    res = subprocess.run([str(BIN / "qpc"), "plan", *EXAMPLE_ARGS], capture_output=True,
                         text=True, cwd=tmp_path, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "storage per day      2.47 GB (messages 1.47 GB + blobs 1.00 GB)" in out
    assert "DB growth per month  74.24 GB" in out
    assert "memory estimate      261.00 MB" in out
    assert "CPU estimate         1 vCPU" in out
    assert "message rate         16.7 msg/s" in out


def test_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*EXAMPLE_ARGS, "--json", "--no-bench"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["storage_per_day_bytes"] == 2_474_560_000
    assert data["inputs"]["users"] == 1000


def test_measured_estimate_from_benchmark_results(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # 20 KB measured per connection, 200 us of server CPU per message.
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"memory_per_connection_bytes": 20_000,
                                   "server_cpu_seconds_per_message": 0.0002}))
    measured = load_measured(summary)
    assert measured is not None and measured["source"] == str(summary)
    p = plan(**EXAMPLE, measured=measured)
    m = p["measured"]
    assert m["memory_bytes"] == 1000 * 20_000 + 256_000_000  # 276 MB
    assert m["vcpus_for_messages"] == pytest.approx(1000 * 60 / 3600 * 0.0002)
    assert m["vcpus_below_warning"] == 1
    # Guide figures are unchanged by the measured ones.
    assert p["memory_bytes"] == 261_000_000
    big = plan(users=100_000, msgs_per_hour=600, msg_size=100, measured=measured)["measured"]
    busy = 100_000 * 600 / 3600 * 0.0002  # 3.33 vCPU busy
    assert big["vcpus_for_messages"] == pytest.approx(busy)
    assert big["vcpus_below_warning"] == math.ceil(busy / 0.7) == 5

    assert main([*EXAMPLE_ARGS, "--bench-results", str(summary)]) == 0
    out = capsys.readouterr().out
    assert f"From qpc's own benchmark ({summary}):" in out
    assert "memory estimate      276.00 MB (20.00 KB per connection measured" in out
    assert "CPU for messages     0.00 vCPU busy (200 us/message measured)" in out


def test_unusable_benchmark_figures_are_ignored(tmp_path: Path) -> None:
    assert plan(**EXAMPLE, measured={"memory_per_connection_bytes": None,
                                     "server_cpu_seconds_per_message": "fast"}).get(
        "measured") is None
    bad = tmp_path / "summary.json"
    bad.write_text("{not json")
    assert load_measured(bad) is None
    assert load_measured(tmp_path / "missing.json") is None


@pytest.mark.parametrize(("args", "message"), [
    (["--users", "-5"], "--users: must be greater than 0, got -5"),
    (["--users", "0"], "--users: must be greater than 0, got 0"),
    (["--users", "1.5"], "--users: expected a whole number, got '1.5'"),
    (["--users", "many"], "--users: expected a whole number, got 'many'"),
    (["--msgs-per-hour", "-1"], "--msgs-per-hour: must not be negative, got -1"),
    (["--msg-size", "nan"], "--msg-size: expected a finite number, got nan"),
    (["--msg-size", "inf"], "--msg-size: expected a finite number, got inf"),
    (["--blob-size-mb", "2MB"], "--blob-size-mb: expected a number, got '2MB'"),
    (["--retention-days", "-30"], "--retention-days: must not be negative, got -30"),
])
def test_bad_input_is_a_clear_error_with_exit_1(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = list(EXAMPLE_ARGS)
    for flag, value in zip(args[::2], args[1::2], strict=True):
        argv[argv.index(flag) + 1] = value
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"qpc: error: {message}"


def test_bad_input_through_qpc_plan(tmp_path: Path) -> None:
    res = subprocess.run([str(BIN / "qpc"), "plan", "--users", "-5", "--msgs-per-hour", "1",
                          "--msg-size", "1"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=60, check=False)
    assert res.returncode == 1
    assert res.stderr.strip() == "qpc: error: --users: must be greater than 0, got -5"
    assert res.stdout == ""


def test_plan_rejects_non_numbers_from_python() -> None:
    with pytest.raises(PlanError, match="--msg-size: expected a number"):
        plan(users=10, msgs_per_hour=1, msg_size="big")  # type: ignore[arg-type]
    with pytest.raises(PlanError, match="--users: expected a number"):
        plan(users=True, msgs_per_hour=1, msg_size=1)
