"""The operations kit (docs/operations/): Prometheus config and alert rules checked by promtool,
every metric they use present on a live /metrics, and the scaling guide's commands run
against a real ``qpc-server`` process."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from qpc_core.admin.testing import get, scrape
from qpc_core.client import QpcClient
from qpc_core.errors import RateLimited
from qpc_core.testing import BIN, ServerProcess, free_tcp_port

ROOT = Path(__file__).resolve().parent.parent
OPS = ROOT / "docs" / "operations"
PROM = OPS / "prometheus"
RULES = PROM / "alerts.yml"
RULE_TESTS = PROM / "alerts.test.yml"
SCRAPE_CONFIG = PROM / "prometheus.yml"
DASHBOARD = OPS / "grafana" / "qpc-dashboard.json"
README = OPS / "README.md"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None,
                                    reason="promtool is not installed (make system-deps)")

# Metrics the rules and the dashboard may use although qpc's /metrics does not expose them:
# host metrics from node_exporter, and Prometheus' own per-target `up`.  Keep this list and
# the one in docs/operations/README.md the same (checked below).
NODE_EXPORTER = {
    "node_cpu_seconds_total",
    "node_memory_MemAvailable_bytes",
    "node_memory_MemTotal_bytes",
    "node_filesystem_avail_bytes",
    "node_filesystem_size_bytes",
}
PROMETHEUS_GENERATED = {"up"}

# The scaling guide's Scaling Triggers table: trigger label → (warning, critical) threshold,
# in the unit of the rule's expression.
TRIGGERS: dict[str, tuple[float, float]] = {
    "cpu": (70, 90),                      # CPU usage %, sustained 5 min
    "memory": (75, 90),                   # memory usage %
    "disk": (70, 90),                     # disk usage %
    "disk_io_latency": (5, 20),           # p95 ms
    "delivery_queue_depth": (10_000, 100_000),
    "rate_limit": (100, 1000),            # rate_limit_hit_total per minute
    "login_failures": (50, 500),          # auth_login_failure_total per minute
    "connections": (80, 95),              # % of the connection limit
    "tls_handshake": (100, 500),          # p95 ms
}


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


# -- promtool ----------------------------------------------------------------------------------


@needs_promtool
def test_promtool_validates_the_rules() -> None:
    res = promtool("check", "rules", RULES.name)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in res.stdout


@needs_promtool
def test_promtool_unit_tests_of_the_rules_pass() -> None:
    res = promtool("test", "rules", RULE_TESTS.name)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


@needs_promtool
def test_promtool_validates_the_scrape_config() -> None:
    res = promtool("check", "config", SCRAPE_CONFIG.name)
    assert res.returncode == 0, res.stdout + res.stderr
    jobs = [j["job_name"] for j in yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]]
    assert jobs == ["qpc", "node"]


# -- the rules implement the guide's table ---------------------------------------------------------


def test_every_scaling_trigger_has_a_warning_and_a_critical_rule() -> None:
    rules = alert_rules()
    seen: dict[str, dict[str, float]] = {}
    for r in rules:
        trigger = r["labels"]["trigger"]
        severity = r["labels"]["severity"]
        assert severity in {"warning", "critical"}, r["alert"]
        assert {"summary", "action", "runbook"} <= set(r["annotations"]), r["alert"]
        if trigger not in TRIGGERS:
            seen.setdefault(trigger, {})[severity] = 0
            continue
        m = re.search(r">\s*([0-9.]+)\s*$", " ".join(r["expr"].split()))
        assert m is not None, f"{r['alert']}: expression must end in '> threshold'"
        seen.setdefault(trigger, {})[severity] = float(m.group(1))
    for trigger, (warn, crit) in TRIGGERS.items():
        assert seen.get(trigger) == {"warning": warn, "critical": crit}, trigger
    extras = set(seen) - set(TRIGGERS)
    # beyond the guide, documented
    assert extras == {"availability", "open_files", "tls_certificate", "config_reload", "kt_log"}


def test_the_unit_tests_cover_every_alert_and_severity() -> None:
    rules = {(r["alert"], r["labels"]["severity"]) for r in alert_rules()}
    doc = yaml.safe_load(RULE_TESTS.read_text())
    tested = set()
    for case in doc["tests"]:
        for check in case["alert_rule_test"]:
            for exp in check.get("exp_alerts") or []:
                tested.add((check["alertname"], exp["exp_labels"]["severity"]))
    assert tested == rules


def test_the_readme_documents_every_alert_and_the_whitelist() -> None:
    text = README.read_text()
    for name in {r["alert"] for r in alert_rules()}:
        assert f"`{name}`" in text, name
    for name in NODE_EXPORTER | PROMETHEUS_GENERATED:
        assert f"- `{name}`" in text, f"{name} missing from the whitelist in {README.name}"


# -- every metric the kit uses exists ------------------------------------------------------------

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "inf", "nan",
}


def metric_names(expr: str) -> set[str]:
    """Metric names used in a PromQL expression (good enough for the kit's expressions)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)                      # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)                     # range selectors
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?", " ", s)  # numbers
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end():].lstrip().startswith("("):
            continue  # a function or aggregation
        if m.group(0).lower() not in PROMQL_WORDS:
            names.add(m.group(0))
    return names


def test_metric_name_extraction() -> None:
    expr = ('1000 * histogram_quantile(0.95, sum by (instance, le) '
            '(rate(tls_handshake_duration_seconds_bucket{instance=~"$instance"}[5m]))) > 1e2 '
            'and on (instance) up{job="qpc"} == 1')
    assert metric_names(expr) == {"tls_handshake_duration_seconds_bucket", "up"}


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*\w+\)", var["query"]["query"])
            assert m is not None, var["name"]
            exprs.append(m.group(1))
    return exprs


def test_dashboard_panels() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"] for p in dash["panels"])
    for words in ("CPU", "Memory", "Disk usage", "Disk I/O", "delivery_queue_depth",
                  "rate_limit_hit_total", "auth_login_failure_total", "Connections", "TLS"):
        assert words in titles, words
    # Each trigger panel draws the guide's thresholds (warning, then critical).
    steps = {p["title"]: [s["value"] for s in p["fieldConfig"]["defaults"]["thresholds"]["steps"]]
             for p in dash["panels"] if p["type"] == "timeseries"}
    assert steps["delivery_queue_depth"] == [None, 10_000, 100_000]
    assert steps["TLS handshake latency (p95)"] == [None, 100, 500]


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(dashboard_queries())
    ]}]}
    f = tmp_path / "dashboard-rules.yml"
    f.write_text(yaml.safe_dump(rules))
    res = promtool("check", "rules", f.name, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


async def test_every_metric_the_kit_uses_is_on_metrics(app_factory, connect) -> None:
    app = await app_factory(plugins=["metrics", "kt_log"], metrics_enabled=True)
    alice, bob = await connect(app), await connect(app)
    await alice.enqueue(bob.identity_key, b"fill the histograms")
    await app.state["kt_log"].sth()  # a stored head (its timestamp is a metric)
    await bob.fetch()
    exposed = (await scrape(app)).names
    used: dict[str, set[str]] = {}
    for r in alert_rules():
        for name in metric_names(r["expr"]):
            used.setdefault(name, set()).add(f"alert {r['alert']}")
    for expr in dashboard_queries():
        for name in metric_names(expr):
            used.setdefault(name, set()).add("dashboard")
    whitelist = NODE_EXPORTER | PROMETHEUS_GENERATED
    missing = {n: sorted(w) for n, w in used.items() if n not in exposed and n not in whitelist}
    assert missing == {}
    assert whitelist <= set(used)  # no stale whitelist entries
    # The guide's own names are all used by the kit or shown on the dashboard.
    for name in ("delivery_queue_depth", "rate_limit_hit_total", "auth_login_failure_total",
                 "enqueue_total", "fetch_total", "server_in_flight_rpcs"):
        assert name in used, name


# -- the guide's commands against a real `qpc-server` process ------------------------------------


async def wait_http(url: str) -> None:
    for _ in range(200):  # bounded poll: the admin app starts right after the QUIC listener
        try:
            if (await get(url, timeout=2)).status == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never answered")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_guide_monitoring_one_liner_shows_live_values(tmp_path: Path) -> None:
    port = free_tcp_port()
    srv = ServerProcess(
        tmp_path / "data",
        args=["--plugins", "metrics"],
        env={"QPC_METRICS_ENABLED": "true", "QPC_METRICS_LISTEN": f"127.0.0.1:{port}",
             "QPC_RATE_LIMITS": json.dumps({"keys": {"requests": 1, "window_secs": 60}})},
    )
    await srv.start()
    clients: list[QpcClient] = []
    try:
        await wait_http(f"http://127.0.0.1:{port}/readyz")
        for _ in range(2):
            clients.append(await QpcClient.connect(
                "127.0.0.1", srv.port, token="devtoken", ca_cert=srv.ca,
                identity=Ed25519PrivateKey.generate()))
        alice, bob = clients
        assert bob.identity_key is not None
        for size in (100, 200, 300, 400, 500):
            await alice.enqueue(bob.identity_key, b"l" * size)
        await bob.fetch(limit=2)
        await alice.upload_key_package(b"kp")
        with pytest.raises(RateLimited):
            await alice.upload_key_package(b"kp again")

        # The scaling guide's command, verbatim except for the port.
        cmd = (f'curl -s http://localhost:{port}/metrics | '
               'grep -E "enqueue_total|fetch_total|delivery_queue_depth|rate_limit"')
        proc = await asyncio.create_subprocess_shell(
            cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        values = {}
        for line in out.decode().splitlines():
            if not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        assert values["enqueue_total"] == 5
        assert values["fetch_total"] == 1
        assert values["delivery_queue_depth"] == 3
        assert values["rate_limit_hit_total"] == 1
        assert set(values) == {"enqueue_total", "fetch_total", "delivery_queue_depth",
                               "rate_limit_hit_total"}
    finally:
        for c in clients:
            await c.close()
        assert await srv.terminate() == 0


@pytest.mark.skipif(shutil.which("pgrep") is None or shutil.which("top") is None,
                    reason="procps (pgrep, top) is not installed")
async def test_guide_top_pgrep_finds_qpc_server(tmp_path: Path) -> None:
    """`top -bn1 -p $(pgrep qpc-server)` (guide, "CPU Scaling") works for `qpc-server`."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "qpc-server"), "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={"PATH": str(BIN), "QPC_DB_KEY": "k", "QPC_METRICS_ENABLED": "false"},
    )
    assert proc.stdout is not None
    try:
        async def started() -> None:
            assert proc.stdout is not None
            while b"started with plugins" not in await proc.stdout.readline():
                assert proc.returncode is None

        await asyncio.wait_for(started(), 60)
        pgrep = await asyncio.to_thread(subprocess.run, ["pgrep", "qpc-server"],
                                        capture_output=True, text=True, check=False, timeout=30)
        assert str(proc.pid) in pgrep.stdout.split()
        top = await asyncio.to_thread(subprocess.run, ["top", "-bn1", "-p", str(proc.pid)],
                                      capture_output=True, text=True, check=False, timeout=30)
        assert top.returncode == 0 and "qpc-server" in top.stdout
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
        assert proc.stdout is not None
        await proc.stdout.read()

