"""Federation benchmark: what a relayed message costs against a local one and the bare echo.

Four servers pinned to the server core: the bare aioquic echo, one qpc server alone (local
delivery) and two federated qpc servers (node1 relays to node2 over mutual-TLS QUIC).  The
load generator (core 1) runs the same closed loop as figure 1: pairs of clients, each
sender with 4 Enqueues in flight, each receiver one FetchWait.  In the relayed runs senders
use node1 and receivers node2, where they are registered (OPAQUE), so every message is
looked up once and relayed.  Loads alternate between the three, ROUNDS rounds per client
count; ratios are medians of per-round ratios.  Server CPU per message sums both nodes.

    .venv/bin/python bench/bench_federation.py [--rounds 3] [--quick]

Prints a table and writes JSON lines to bench/results/federation.jsonl.  Never a test.
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
sys.path.insert(0, str(ROOT / "plugins" / "federation"))  # usable without `pip install -e`

from qpc_federation import certs  # noqa: E402

from bench.common import RESULTS, free_udp_port, machine  # noqa: E402
from bench.run_all import Server  # noqa: E402

TOKEN = ["--token", "bench-token-0123456789"]


def fed_table(d: Path, domain: str, port: int, peer: str, peer_port: int) -> str:
    return f'''
[auth_opaque]
ksf = "identity"
[rate_limits.federation]
requests = 100000000
window_secs = 1
[rate_limits.users]
requests = 100000000
window_secs = 1
[federation]
enabled = true
domain = "{domain}"
listen = "127.0.0.1:{port}"
federation_cert = "{d / certs.NODE_CERT}"
federation_key = "{d / certs.NODE_KEY}"
federation_ca = "{d / certs.CA_CERT}"
[[federation.peers]]
domain = "{peer}"
address = "127.0.0.1:{peer_port}"
'''


def run(work: Path, rounds: int, counts: dict[int, int]) -> list[dict[str, Any]]:
    certs.make_ca(work / "ca")
    f1, f2 = free_udp_port(), free_udp_port()
    top = 'plugins = ["auth_opaque", "federation"]\n'
    nodes = []
    for domain, port, peer, peer_port in (("node1.bench", f1, "node2.bench", f2),
                                          ("node2.bench", f2, "node1.bench", f1)):
        d = work / domain
        certs.issue(work / "ca", d, domain)
        nodes.append(Server("qpc", work, top=top, tables=fed_table(d, domain, port, peer,
                                                                    peer_port)))
    echo = Server("echo", work)
    solo = Server("qpc", work)
    n1, n2 = nodes
    rows: list[dict[str, Any]] = []
    try:
        for clients, count in counts.items():
            per: dict[str, list[dict[str, Any]]] = {"echo": [], "local": [], "relayed": []}
            for i in range(rounds):
                order = ["echo", "local", "relayed"]
                order = order[i % 3:] + order[:i % 3]
                for kind in order:
                    base = ["--clients", str(clients), "--count", str(count), "--window", "4",
                            "--seconds", "20"]
                    if kind == "echo":
                        r = echo.measured("echo", "--clients", str(clients), "--count",
                                          str(count), "--window", "2", "--seconds", "20")
                        r["per_sec"] = r["req_per_sec"]
                        r["cpu_ms"] = 1000 * r["server_cpu_s"] / max(1, r["requests"])
                    elif kind == "local":
                        r = solo.measured("deliver", *base)
                        r["per_sec"] = r["msgs_per_sec"]
                        r["cpu_ms"] = 1000 * r["server_cpu_s"] / max(1, r["delivered"])
                    else:
                        c0 = n2.cpu()
                        r = n1.measured("deliver", *base, "--receiver-port", str(n2.port),
                                        "--receiver-ca", n2.ca)
                        both = r["server_cpu_s"] + n2.cpu() - c0
                        r["per_sec"] = r["msgs_per_sec"]
                        r["cpu_ms"] = 1000 * both / max(1, r["delivered"])
                    per[kind].append(r)
            row = summarize(clients, per)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        for s in (*nodes, echo, solo):
            s.stop()
    return rows


def summarize(clients: int, per: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def med(kind: str, key: str) -> float:
        return float(statistics.median(r[key] for r in per[kind]))

    def ratios(a: str, b: str) -> list[float]:
        return [x["per_sec"] / y["per_sec"] for x, y in zip(per[a], per[b], strict=True)]

    relayed_vs_echo = ratios("relayed", "echo")
    relayed_vs_local = ratios("relayed", "local")
    local_vs_echo = ratios("local", "echo")
    return {
        "figure": "federation", "clients": clients,
        "echo_req_per_sec": round(med("echo", "per_sec"), 1),
        "local_msgs_per_sec": round(med("local", "per_sec"), 1),
        "relayed_msgs_per_sec": round(med("relayed", "per_sec"), 1),
        "relayed_vs_local": round(statistics.median(relayed_vs_local), 2),
        "relayed_vs_local_rounds": [round(x, 2) for x in relayed_vs_local],
        "relayed_vs_echo": round(statistics.median(relayed_vs_echo), 2),
        "local_vs_echo": round(statistics.median(local_vs_echo), 2),
        "cpu_ms_per_msg": {k: round(med(k, "cpu_ms"), 3) for k in per},
        "relayed_latency_ms": sorted(per["relayed"], key=lambda r: r["latency_ms"]["p99"])[
            len(per["relayed"]) // 2]["latency_ms"],
        "local_latency_ms": sorted(per["local"], key=lambda r: r["latency_ms"]["p99"])[
            len(per["local"]) // 2]["latency_ms"],
        "delivered_of_sent": {k: [f"{r['delivered']}/{r.get('sent', r.get('requests'))}"
                                  for r in per[k]] for k in ("local", "relayed")},
        "leftover": sum(r["leftover"] for r in per["relayed"]),
    }


def table(rows: list[dict[str, Any]]) -> str:
    out = ("| clients | echo req/s | local msg/s | relayed msg/s | relayed / local | per round "
           "| relayed / echo | CPU ms/msg local | CPU ms/msg relayed (both nodes) | relayed "
           "p50 / p99 ms | local p50 / p99 ms |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        rl, ll = r["relayed_latency_ms"], r["local_latency_ms"]
        out += (f"| {r['clients']} | {r['echo_req_per_sec']:.0f} | "
                f"{r['local_msgs_per_sec']:.0f} | {r['relayed_msgs_per_sec']:.0f} | "
                f"{r['relayed_vs_local']:.2f} | "
                f"{', '.join(f'{x:.2f}' for x in r['relayed_vs_local_rounds'])} | "
                f"{r['relayed_vs_echo']:.2f} | {r['cpu_ms_per_msg']['local']:.3f} | "
                f"{r['cpu_ms_per_msg']['relayed']:.3f} | {rl['p50']:.1f} / {rl['p99']:.1f} | "
                f"{ll['p50']:.1f} / {ll['p99']:.1f} |\n")
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    counts = {2: 1000, 50: 2000} if a.quick else {2: 6000, 50: 12000}
    with tempfile.TemporaryDirectory(prefix="qpc-bench-fed-") as tmp:
        rows = run(Path(tmp), 1 if a.quick else a.rounds, counts)
    m = machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "federation.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps({**r, "machine": m}) + "\n")
    print("Senders on node1, receivers registered on node2 (every message looked up once, then "
          "relayed over mutual-TLS QUIC), against one qpc server alone (local) and the bare "
          "echo, all on the server core; 4 Enqueues in flight per sender. CPU per relayed "
          "message sums both nodes. Ratios: medians of per-round ratios.\n")
    print(table(rows))


if __name__ == "__main__":
    main()
