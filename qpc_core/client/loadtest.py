"""Load generator: enqueue -> delivery throughput and latency (``qpc-client loadtest``).

Clients come in pairs: a sender enqueues to its partner, the partner long-polls (FetchWait)
and measures delivery latency from the timestamp inside each payload.  Closed loop by
default (``window`` calls in flight per sender); with ``rate`` the senders run open loop at
that total rate, timing each message from its *scheduled* send time so slow answers are not
hidden (no coordinated omission).  Every loop is bounded by message count and by time.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from qpc_core.client.sdk import QpcClient
from qpc_core.errors import RpcError

_TS = struct.Struct(">d")


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q / 100.0 * (len(sorted_values) - 1))))
    return sorted_values[k]


@dataclass
class LoadResult:
    clients: int
    sent: int
    delivered: int
    errors: int
    seconds: float
    msgs_per_sec: float
    latency_ms: dict[str, float] = field(default_factory=dict)
    rate: float | None = None
    # Acknowledged messages still in the store when the run ended (fetched afterwards):
    # non-zero means a FetchWait was not woken for them within the run.
    leftover: int = 0
    # CPU seconds this load generator itself used during the run: near ``seconds`` means
    # the generator, not the server, was the limit.
    client_cpu_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def run_loadtest(
    host: str, port: int, *, token: str | None, ca_cert: str | Path | None = None,
    insecure: bool = False, clients: int = 2, messages: int = 1000, size: int = 256,
    rate: float | None = None, window: int = 4, max_seconds: float = 60.0,
    quic_backend: str | None = None, receiver_port: int | None = None,
    receiver_ca_cert: str | Path | None = None,
    receiver_identities: Sequence[Ed25519PrivateKey] | None = None,
) -> LoadResult:
    """Run ``clients`` (even) clients in pairs until ``messages`` are delivered or time is up.

    By default senders and receivers use the server at ``port``.  With ``receiver_port`` the
    receivers connect to that server instead (on ``host``, trusting ``receiver_ca_cert``):
    messages then cross a federation, when the receivers' ``receiver_identities`` are users
    of that server."""
    if clients < 2 or clients % 2:
        raise ValueError("--clients must be an even number >= 2 (clients work in pairs)")
    if size < _TS.size:
        raise ValueError(f"--size must be at least {_TS.size} bytes")
    n_pairs = clients // 2
    rx_ids = list(receiver_identities or ())
    rx_ids += [Ed25519PrivateKey.generate() for _ in range(n_pairs - len(rx_ids))]

    def open_client(p: int, ident: Ed25519PrivateKey, ca: str | Path | None) -> Any:
        return QpcClient.connect(host, p, token=token, identity=ident, ca_cert=ca,
                                 insecure=insecure, quic_backend=quic_backend)

    senders = [open_client(port, Ed25519PrivateKey.generate(), ca_cert) for _ in range(n_pairs)]
    receivers = [open_client(receiver_port or port, rx_ids[i],
                             receiver_ca_cert if receiver_port else ca_cert)
                 for i in range(n_pairs)]
    conns = await asyncio.gather(*senders, *receivers)
    pairs = list(zip(conns[:n_pairs], conns[n_pairs:], strict=True))
    per_sender = max(1, messages // len(pairs))
    total = per_sender * len(pairs)
    latencies: list[float] = []
    errors = 0
    delivered = 0
    done = asyncio.Event()
    deadline = time.monotonic() + max_seconds
    pad = b"\0" * (size - _TS.size)

    async def receive(rx: QpcClient, expect: int) -> None:
        nonlocal delivered
        got = 0
        while got < expect and time.monotonic() < deadline and not done.is_set():
            try:
                msgs = await rx.fetch_wait(1000)
            except RpcError:
                continue
            now = time.time()
            for m in msgs:
                latencies.append((now - _TS.unpack_from(m.data)[0]) * 1000.0)
            got += len(msgs)
            delivered += len(msgs)
            if delivered >= total:
                done.set()

    async def send_closed(tx: QpcClient, rx_key: bytes) -> int:
        nonlocal errors
        sent = 0
        sem = asyncio.Semaphore(window)

        async def one() -> None:
            nonlocal errors
            try:
                await tx.enqueue(rx_key, _TS.pack(time.time()) + pad, verify=False)
            except RpcError:
                errors += 1
            finally:
                sem.release()

        tasks = []
        while sent < per_sender and time.monotonic() < deadline:
            await sem.acquire()
            tasks.append(asyncio.ensure_future(one()))
            sent += 1
        await asyncio.gather(*tasks)
        return sent

    async def send_open(tx: QpcClient, rx_key: bytes, per_sender_rate: float, phase: float) -> int:
        nonlocal errors
        interval = 1.0 / per_sender_rate
        # Senders are phase-shifted so the combined schedule is evenly spaced at the total
        # rate; without this every sender fires at the same instant (bursts of N/2 messages).
        start = t_start + phase * interval
        tasks = []

        async def one(at: float) -> None:
            nonlocal errors
            try:
                await tx.enqueue(rx_key, _TS.pack(at) + pad, verify=False)
            except RpcError:
                errors += 1

        for i in range(per_sender):
            at = start + i * interval
            delay = at - time.time()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the open-loop schedule, not synchronising
            if time.monotonic() >= deadline:
                break
            tasks.append(asyncio.ensure_future(one(at)))
        await asyncio.gather(*tasks)
        return len(tasks)

    t0 = time.perf_counter()
    c0 = time.process_time()
    t_start = time.time() + 0.05
    receivers = [asyncio.ensure_future(receive(rx, per_sender)) for _tx, rx in pairs]
    if rate:
        senders = [send_open(tx, rx.identity_key or b"", rate / len(pairs), k / len(pairs))
                   for k, (tx, rx) in enumerate(pairs)]
    else:
        senders = [send_closed(tx, rx.identity_key or b"") for tx, rx in pairs]
    sent_counts = await asyncio.gather(*senders)
    try:
        await asyncio.wait_for(done.wait(), max(0.1, deadline - time.monotonic()))
    except TimeoutError:
        pass
    elapsed = time.perf_counter() - t0
    client_cpu = time.process_time() - c0
    done.set()
    await asyncio.gather(*receivers, return_exceptions=True)
    leftover = 0
    for _tx, rx in pairs:
        try:
            for _ in range(1000):  # a fetch answers at most its size budget: drain, bounded
                got = len(await rx.fetch())
                leftover += got
                if not got:
                    break
        except RpcError:
            pass
    await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
    lat = sorted(latencies)
    return LoadResult(
        clients=clients, sent=sum(sent_counts), delivered=delivered, errors=errors,
        seconds=round(elapsed, 3), msgs_per_sec=round(delivered / elapsed, 1) if elapsed else 0,
        latency_ms={"p50": round(percentile(lat, 50), 3), "p99": round(percentile(lat, 99), 3),
                    "p99.9": round(percentile(lat, 99.9), 3),
                    "max": round(lat[-1], 3) if lat else float("nan")},
        rate=rate, leftover=leftover, client_cpu_s=round(client_cpu, 3),
    )


def format_result(r: LoadResult, as_json: bool) -> str:
    if as_json:
        return json.dumps(r.as_dict())
    lat = r.latency_ms
    return (
        f"{'clients':>8} {'sent':>8} {'delivered':>10} {'errors':>7} {'msg/s':>10} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9}\n"
        f"{r.clients:>8} {r.sent:>8} {r.delivered:>10} {r.errors:>7} {r.msgs_per_sec:>10.1f} "
        f"{lat['p50']:>8.2f} {lat['p99']:>8.2f} {lat['p99.9']:>9.2f}"
    )
