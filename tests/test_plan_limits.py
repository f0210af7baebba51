"""`qpc plan` refuses inputs so large that a result would overflow (``--json`` would print
``Infinity``, which is not JSON): an error naming the option, exit status 1."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from qpc_core.plan import LIMITS, PlanError, main, plan

BASE = ["--users", "10", "--msgs-per-hour", "1", "--msg-size", "1", "--no-bench", "--json"]


def _argv(**values: str) -> list[str]:
    argv = list(BASE)
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


def test_the_reported_overflow_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_argv(msgs_per_hour="1e308", msg_size="1e308")) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "qpc: error: --msgs-per-hour: must be at most 1,000,000, got 1e+308\n"


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_each_option_has_a_finite_limit(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    limit = LIMITS[name]
    flag = "--" + name.replace("_", "-")
    assert main(_argv(**{name: str(int(limit) * 10)})) == 1
    assert capsys.readouterr().err.startswith(f"qpc: error: {flag}: must be at most ")
    assert main(_argv(**{name: str(int(limit))})) == 0  # the limit itself is accepted
    json.loads(capsys.readouterr().out)


def test_all_limits_at_once_stay_finite_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_argv(**{k: str(int(v)) for k, v in LIMITS.items()})) == 0
    out = capsys.readouterr().out
    assert "Infinity" not in out and "NaN" not in out

    def numbers(d: dict[str, Any]) -> list[float]:
        got: list[float] = []
        for v in d.values():
            got += numbers(v) if isinstance(v, dict) else [v] if isinstance(v, float) else []
        return got

    values = numbers(json.loads(out, parse_constant=lambda c: pytest.fail(f"got {c}")))
    assert values and all(math.isfinite(v) for v in values)


def test_huge_integer_users_is_an_error_not_a_crash(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_argv(users="1" + "0" * 400)) == 1
    assert capsys.readouterr().err == (
        "qpc: error: --users: must be at most 1,000,000,000, got a 401-digit number\n")


def test_absurd_benchmark_figures_do_not_produce_infinity() -> None:
    measured = {"memory_per_connection_bytes": 1e308, "server_cpu_seconds_per_message": 0.001}
    with pytest.raises(PlanError, match=r"measured\.memory_bytes is not a finite number"):
        plan(users=1000, msgs_per_hour=1, msg_size=1, measured=measured)
