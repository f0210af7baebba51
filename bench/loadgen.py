"""Load generator processes for the benchmarks; prints one JSON line with its figures.

Modes (every loop is bounded by a count and by time):
  echo      N connections, closed loop, request frames the size of an Enqueue -> requests/s
  deliver   qpc enqueue -> delivery in pairs (closed loop, or open loop with --rate)
  handshake COUNT QUIC handshakes at concurrency C -> handshakes/s, latency p50/p95
  idle      open N connections (qpc: authenticated + identity proven), hold until stdin closes
  login     COUNT OPAQUE logins (new connection each) at concurrency C -> logins/s
  ws_deliver  enqueue -> delivery in pairs over the WebSocket bridge (--ws-url), closed loop
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "plugins" / "ws_bridge"))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from qpc_core.client.loadtest import percentile, run_loadtest
from qpc_core.client.sdk import CLIENT_BACKEND_ENV, QpcClient, client_configuration
from qpc_core.framing import encode_request


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def raw_connect(host: str, port: int, ca: str) -> QpcClient:
    return await QpcClient.connect(host, port, token=None, identity=None, ca_cert=ca)


async def mode_echo(a: argparse.Namespace) -> dict[str, Any]:
    conns = await asyncio.gather(*(raw_connect(a.host, a.port, a.ca) for _ in range(a.clients)))
    payload = b"\0" * (a.size + 70)  # about the size of an EnqueueRequest for `size`
    deadline = time.monotonic() + a.seconds
    lat: list[float] = []
    done = 0

    async def worker(c: QpcClient) -> None:
        nonlocal done
        while done < a.count and time.monotonic() < deadline:
            t = time.perf_counter()
            await c.protocol.roundtrip(encode_request(200, 1, payload), raw=True)
            lat.append((time.perf_counter() - t) * 1000)
            done += 1

    t0 = time.perf_counter()
    c0 = time.process_time()
    await asyncio.gather(*(worker(c) for c in conns for _ in range(a.window)))
    el = time.perf_counter() - t0
    client_cpu = time.process_time() - c0
    await asyncio.gather(*(c.close() for c in conns))
    lat.sort()
    return {"mode": "echo", "clients": a.clients, "requests": done, "seconds": round(el, 3),
            "client_cpu_s": round(client_cpu, 3),
            "req_per_sec": round(done / el, 1),
            "latency_ms": {"p50": round(percentile(lat, 50), 3),
                           "p99": round(percentile(lat, 99), 3)}}


async def register_receivers(a: argparse.Namespace) -> list[Ed25519PrivateKey]:
    """Users of the receivers' server (OPAQUE with the identity KSF), so that a federation
    finds them there."""
    from qpc_auth_opaque import client as oc
    from qpc_auth_opaque import opaque

    ksf = opaque.IdentityKSF()
    keys = [Ed25519PrivateKey.generate() for _ in range(a.clients // 2)]
    sem = asyncio.Semaphore(8)
    tag = os.urandom(3).hex()

    async def one(i: int, key: Ed25519PrivateKey) -> None:
        async with sem:
            c = await QpcClient.connect(a.host, a.receiver_port, token=None, identity=key,
                                        ca_cert=a.receiver_ca)
            try:
                await oc.register(c, f"rx{tag}{i}", "pw", ksf=ksf)
            finally:
                await c.close()

    await asyncio.gather(*(one(i, k) for i, k in enumerate(keys)))
    return keys


async def mode_deliver(a: argparse.Namespace) -> dict[str, Any]:
    rx = await register_receivers(a) if a.receiver_port else None
    r = await run_loadtest(a.host, a.port, token=a.token, ca_cert=a.ca, clients=a.clients,
                           messages=a.count, size=a.size, rate=a.rate, window=a.window,
                           max_seconds=a.seconds, receiver_port=a.receiver_port,
                           receiver_ca_cert=a.receiver_ca, receiver_identities=rx)
    return {"mode": "deliver", **r.as_dict()}


async def mode_handshake(a: argparse.Namespace) -> dict[str, Any]:
    cfg_ca = a.ca
    lat: list[float] = []
    started = 0
    deadline = time.monotonic() + a.seconds

    async def one() -> None:
        nonlocal started
        while started < a.count and time.monotonic() < deadline:
            started += 1
            t = time.perf_counter()
            c = await QpcClient.connect(a.host, a.port, token=a.token, identity=None,
                                        ca_cert=cfg_ca)
            lat.append((time.perf_counter() - t) * 1000)
            await c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(a.concurrency)))
    el = time.perf_counter() - t0
    lat.sort()
    return {"mode": "handshake", "concurrency": a.concurrency, "handshakes": len(lat),
            "seconds": round(el, 3), "per_sec": round(len(lat) / el, 1),
            "latency_ms": {"p50": round(percentile(lat, 50), 3),
                           "p95": round(percentile(lat, 95), 3)}}


async def mode_idle(a: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    conns: list[QpcClient] = []
    sem = asyncio.Semaphore(32)

    async def one() -> None:
        async with sem:
            ident = Ed25519PrivateKey.generate() if a.token else None
            conns.append(await QpcClient.connect(a.host, a.port, token=a.token, identity=ident,
                                                 ca_cert=a.ca))

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(a.clients)))
    print(json.dumps({"ready": len(conns), "seconds": round(time.perf_counter() - t0, 2)}),
          flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
    return {"mode": "idle", "clients": len(conns)}


async def mode_login(a: argparse.Namespace) -> dict[str, Any]:
    from qpc_auth_opaque import client as oc
    from qpc_auth_opaque import opaque

    ksf = opaque.IdentityKSF()
    users = []
    for i in range(a.concurrency):
        key = Ed25519PrivateKey.generate()
        c = await QpcClient.connect(a.host, a.port, token=None, identity=key, ca_cert=a.ca)
        name = f"bench{i}{int(time.time() * 1000) % 100000}"
        await oc.register(c, name, "pw", ksf=ksf)
        await c.close()
        users.append((name, key))
    lat: list[float] = []
    started = 0
    deadline = time.monotonic() + a.seconds

    async def worker(name: str, key: Ed25519PrivateKey) -> None:
        nonlocal started
        while started < a.count and time.monotonic() < deadline:
            started += 1
            t = time.perf_counter()
            c = await QpcClient.connect(a.host, a.port, token=None, identity=key, ca_cert=a.ca)
            await oc.login(c, name, "pw", ksf=ksf)
            lat.append((time.perf_counter() - t) * 1000)
            await c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(n, k) for n, k in users))
    el = time.perf_counter() - t0
    lat.sort()
    return {"mode": "login", "concurrency": a.concurrency, "logins": len(lat),
            "seconds": round(el, 3), "per_sec": round(len(lat) / el, 1),
            "latency_ms": {"p50": round(percentile(lat, 50), 3),
                           "p95": round(percentile(lat, 95), 3)}}


async def mode_ws_deliver(a: argparse.Namespace) -> dict[str, Any]:
    """``deliver``'s closed loop over the WebSocket bridge: pairs of WsClient, the sender with
    ``window`` Enqueues in flight, the receiver one FetchWait at a time."""
    from qpc_ws_bridge.client import WsClient

    ctx = None
    if a.ws_ca:
        import ssl

        ctx = ssl.create_default_context(cafile=a.ws_ca)
    pairs = []
    for _ in range(a.clients // 2):
        tx, rx = [await WsClient.connect(a.ws_url, token=a.token, ssl_context=ctx,
                                         identity=Ed25519PrivateKey.generate())
                  for _ in range(2)]
        pairs.append((tx, rx))
    per_sender = max(1, a.count // len(pairs))
    total = per_sender * len(pairs)
    deadline = time.monotonic() + a.seconds
    lat: list[float] = []
    delivered = errors = 0
    done = asyncio.Event()
    pad = b"\0" * (a.size - 8)

    async def receive(rx: WsClient) -> None:
        nonlocal delivered
        got = 0
        while got < per_sender and time.monotonic() < deadline and not done.is_set():
            msgs = await rx.fetch_wait(1000)
            now = time.time()
            for m in msgs:
                lat.append((now - struct.unpack_from(">d", m.data)[0]) * 1000.0)
            got += len(msgs)
            delivered += len(msgs)
            if delivered >= total:
                done.set()

    async def send(tx: WsClient, to: bytes) -> None:
        nonlocal errors
        sem = asyncio.Semaphore(a.window)

        async def one() -> None:
            nonlocal errors
            try:
                await tx.enqueue(to, struct.pack(">d", time.time()) + pad)
            except Exception:
                errors += 1
            finally:
                sem.release()

        tasks = []
        for _ in range(per_sender):
            if time.monotonic() >= deadline:
                break
            await sem.acquire()
            tasks.append(asyncio.ensure_future(one()))
        await asyncio.gather(*tasks)

    t0 = time.perf_counter()
    c0 = time.process_time()
    receivers = [asyncio.ensure_future(receive(rx)) for _tx, rx in pairs]
    await asyncio.gather(*(send(tx, rx.identity_key or b"") for tx, rx in pairs))
    try:
        await asyncio.wait_for(done.wait(), max(0.1, deadline - time.monotonic()))
    except TimeoutError:
        pass
    el = time.perf_counter() - t0
    client_cpu = time.process_time() - c0
    done.set()
    for r in receivers:
        r.cancel()
    await asyncio.gather(*receivers, return_exceptions=True)
    await asyncio.gather(*(c.close() for p in pairs for c in p), return_exceptions=True)
    lat.sort()
    return {"mode": "ws_deliver", "clients": a.clients, "sent": total, "delivered": delivered,
            "errors": errors, "seconds": round(el, 3), "client_cpu_s": round(client_cpu, 3),
            "msgs_per_sec": round(delivered / el, 1), "leftover": 0,
            "latency_ms": {"p50": round(percentile(lat, 50), 3),
                           "p99": round(percentile(lat, 99), 3)}}


MODES = {"echo": mode_echo, "deliver": mode_deliver, "handshake": mode_handshake,
         "idle": mode_idle, "login": mode_login, "ws_deliver": mode_ws_deliver}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=sorted(MODES))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--token", default=None)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--rate", type=float, default=None)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--receiver-port", type=int, default=None,
                   help="deliver: receivers use this server (registered there with OPAQUE)")
    p.add_argument("--receiver-ca", default=None)
    p.add_argument("--ws-url", default=None, help="ws_deliver: the bridge's ws:// URL")
    p.add_argument("--ws-ca", default=None, help="ws_deliver: CA file for a wss:// URL")
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--quic-backend", choices=("aioquic", "qh3"), default="aioquic",
                   help="the clients' QUIC library")
    p.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio",
                   help="the clients' event loop")
    a = p.parse_args()
    _ = client_configuration  # imported for side-effect-free availability checks
    os.environ[CLIENT_BACKEND_ENV] = a.quic_backend  # every QpcClient.connect of this run
    if a.event_loop == "uvloop":
        import uvloop

        uvloop.install()
    print(json.dumps(asyncio.run(MODES[a.mode](a))), flush=True)


if __name__ == "__main__":
    main()
