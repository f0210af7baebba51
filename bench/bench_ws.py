"""WebSocket bridge benchmark: enqueue -> delivery through the bridge against QUIC and the echo.

Two servers pinned to the server core: the bare aioquic echo and one qpc server with the
``ws_bridge`` plugin.  The load generator (core 1) runs figure 1's closed loop (pairs of
clients, 4 Enqueues in flight per sender, one FetchWait per receiver) once over QUIC and
once over the bridge (``loadgen.py ws_deliver``, the plugin's Python client), and the echo
at the same client count; the three alternate, ROUNDS rounds per client count; ratios are
medians of per-round ratios.

    .venv/bin/python bench/bench_ws.py [--rounds 3] [--quick]

Prints a table and writes JSON lines to bench/results/ws.jsonl.  Never a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, free_tcp_port, machine  # noqa: E402
from bench.run_all import Server  # noqa: E402


def run(work: Path, rounds: int, counts: dict[int, int]) -> list[dict[str, Any]]:
    ws_port, wss_port = free_tcp_port(), free_tcp_port()
    qpc = Server("qpc", work, top='plugins = ["ws_bridge"]\n',
                 tables=f'[ws_bridge]\nlisten = "127.0.0.1:{ws_port}"\n')
    # The same over TLS (wss://, the server's development certificate): what a browser
    # connecting directly uses; plain ws:// is what a TLS reverse proxy forwards.
    tls = Server("qpc", work, top='plugins = ["ws_bridge"]\n',
                 tables=f'[ws_bridge]\nlisten = "127.0.0.1:{wss_port}"\ntls = true\n')
    echo = Server("echo", work)
    url = f"ws://127.0.0.1:{ws_port}/v1/ws"
    tls_url = f"wss://localhost:{wss_port}/v1/ws"
    tls_ca = str(tls.dir / "data" / "ca-cert.pem")
    rows: list[dict[str, Any]] = []
    try:
        for clients, count in counts.items():
            per: dict[str, list[dict[str, Any]]] = {"echo": [], "quic": [], "ws": [], "wss": []}
            for i in range(rounds):
                order = ["echo", "quic", "ws", "wss"]
                order = order[i % 4:] + order[:i % 4]
                for kind in order:
                    base = ["--clients", str(clients), "--count", str(count), "--window", "4",
                            "--seconds", "20"]
                    if kind == "echo":
                        r = echo.measured("echo", "--clients", str(clients), "--count",
                                          str(count), "--window", "2", "--seconds", "20")
                        r["per_sec"], n = r["req_per_sec"], r["requests"]
                    elif kind == "quic":
                        r = qpc.measured("deliver", *base)
                        r["per_sec"], n = r["msgs_per_sec"], r["delivered"]
                    elif kind == "ws":
                        r = qpc.measured("ws_deliver", *base, "--ws-url", url)
                        r["per_sec"], n = r["msgs_per_sec"], r["delivered"]
                    else:
                        r = tls.measured("ws_deliver", *base, "--ws-url", tls_url,
                                         "--ws-ca", tls_ca)
                        r["per_sec"], n = r["msgs_per_sec"], r["delivered"]
                    r["cpu_ms"] = 1000 * r["server_cpu_s"] / max(1, n)
                    per[kind].append(r)
            row = summarize(clients, per)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        for s in (qpc, tls, echo):
            s.stop()
    return rows


def summarize(clients: int, per: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def med(kind: str, key: str) -> float:
        return float(statistics.median(r[key] for r in per[kind]))

    def ratios(a: str, b: str) -> list[float]:
        return [x["per_sec"] / y["per_sec"] for x, y in zip(per[a], per[b], strict=True)]

    def p99(kind: str) -> dict[str, float]:
        rs = sorted(per[kind], key=lambda r: r["latency_ms"]["p99"])
        latency: dict[str, float] = rs[len(rs) // 2]["latency_ms"]
        return latency

    ws_vs_quic = ratios("ws", "quic")
    wss_vs_quic = ratios("wss", "quic")
    return {
        "figure": "ws_bridge", "clients": clients,
        "echo_req_per_sec": round(med("echo", "per_sec"), 1),
        "quic_msgs_per_sec": round(med("quic", "per_sec"), 1),
        "ws_msgs_per_sec": round(med("ws", "per_sec"), 1),
        "ws_vs_quic": round(statistics.median(ws_vs_quic), 2),
        "ws_vs_quic_rounds": [round(x, 2) for x in ws_vs_quic],
        "ws_vs_echo": round(statistics.median(ratios("ws", "echo")), 2),
        "wss_msgs_per_sec": round(med("wss", "per_sec"), 1),
        "wss_vs_quic": round(statistics.median(wss_vs_quic), 2),
        "wss_vs_quic_rounds": [round(x, 2) for x in wss_vs_quic],
        "wss_vs_echo": round(statistics.median(ratios("wss", "echo")), 2),
        "quic_vs_echo": round(statistics.median(ratios("quic", "echo")), 2),
        "cpu_ms_per_msg": {k: round(med(k, "cpu_ms"), 3) for k in per},
        "ws_latency_ms": p99("ws"), "wss_latency_ms": p99("wss"),
        "quic_latency_ms": p99("quic"),
        "delivered_of_sent": {k: [f"{r['delivered']}/{r['sent']}" for r in per[k]]
                              for k in ("quic", "ws", "wss")},
        "ws_errors": sum(r["errors"] for r in per["ws"] + per["wss"]),
    }


def table(rows: list[dict[str, Any]]) -> str:
    out = ("| clients | echo req/s | QUIC msg/s | ws:// msg/s | wss:// msg/s | ws / QUIC "
           "| wss / QUIC (rounds) | QUIC / echo | ws / echo | wss / echo "
           "| server CPU ms/msg QUIC / ws / wss (echo ms/req) | p50 / p99 ms QUIC, ws, wss |\n"
           "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        c = r["cpu_ms_per_msg"]
        lat = ", ".join(f"{r[k]['p50']:.1f} / {r[k]['p99']:.1f}"
                        for k in ("quic_latency_ms", "ws_latency_ms", "wss_latency_ms"))
        out += (f"| {r['clients']} | {r['echo_req_per_sec']:.0f} | "
                f"{r['quic_msgs_per_sec']:.0f} | {r['ws_msgs_per_sec']:.0f} | "
                f"{r['wss_msgs_per_sec']:.0f} | {r['ws_vs_quic']:.2f} | {r['wss_vs_quic']:.2f} "
                f"({', '.join(f'{x:.2f}' for x in r['wss_vs_quic_rounds'])}) | "
                f"{r['quic_vs_echo']:.2f} | {r['ws_vs_echo']:.2f} | {r['wss_vs_echo']:.2f} | "
                f"{c['quic']:.3f} / {c['ws']:.3f} / {c['wss']:.3f} ({c['echo']:.3f}) | "
                f"{lat} |\n")
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    counts = {2: 1000, 50: 2000} if a.quick else {2: 6000, 50: 12000}
    with tempfile.TemporaryDirectory(prefix="qpc-bench-ws-") as tmp:
        rows = run(Path(tmp), 1 if a.quick else a.rounds, counts)
    m = machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "ws.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps({**r, "machine": m}) + "\n")
    print("One qpc server with the ws_bridge plugin and the bare echo on the server core; the "
          "same closed loop over QUIC and over the bridge (4 Enqueues in flight per sender). "
          "Ratios: medians of per-round ratios.\n")
    print(table(rows))


if __name__ == "__main__":
    main()
