"""Blob upload/download throughput next to a bare aioquic bulk stream, measured in one run.

    .venv/bin/python bench/bench_blobs.py [--sizes 1000000,50000000] [--chunk 262144]

Starts two servers on 127.0.0.1, each in its own process (pinned to core 0, the client to
core 1, as bench/run_all.py does):

* ``qpc run --plugins blobs`` (free port, temporary data dir, ``QPC_DB_KEY`` set);
* a minimal bare aioquic server (this file with ``--bare-server``) using the same TLS
  certificate and the same QUIC flow-control settings as qpc's listener.

The client (this process) uploads and downloads random blobs of each size with the
``qpc_blobs.client`` SDK, then moves the same number of bytes over one bare QUIC stream in
the same chunk sizes (writer side: one ``send_stream_data`` per chunk; the receiver answers
once the stream ends).  It prints a table and appends JSON lines to
``bench/results/blobs.jsonl``.  Benchmarks are not tests: nothing here asserts a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent, StreamDataReceived

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "blobs.jsonl"
BIN = Path(sys.executable).parent
BARE_ALPN = "qpc-bare-bench"
MB = 1_000_000
DEADLINE_SECS = 170.0  # the whole run stays under 3 minutes
SERVER_CORE, CLIENT_CORE = 0, 1
_HEADER = struct.Struct(">cQI")  # op (U/D), size, chunk


def pin(pid: int, core: int) -> None:
    """Pin like bench/run_all.py: servers on core 0, the client on core 1 (if 2+ cores)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) > 1:
        os.sched_setaffinity(pid, {cores[core]})


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the bare aioquic server (runs in its own process) -----------------------------------------


def server_configuration(cert: Path, key: Path) -> QuicConfiguration:
    """Flow control exactly as qpc's QuicTransport.configuration (4 MiB max payload)."""
    cfg = QuicConfiguration(
        is_client=False, alpn_protocols=[BARE_ALPN], idle_timeout=300.0,
        max_datagram_frame_size=None, max_data=16 * 1024 * 1024,
        max_stream_data=max(4 * 1024 * 1024 + 64, 1024 * 1024),
    )
    cfg.load_cert_chain(str(cert), str(key))
    return cfg


class BareServerProtocol(QuicConnectionProtocol):
    """``U size chunk`` + bytes → ``OK`` after FIN; ``D size chunk`` → size bytes, in chunks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.streams: dict[int, list[Any]] = {}  # sid -> [header bytes, received count]

    def quic_event_received(self, event: QuicEvent) -> None:
        if not isinstance(event, StreamDataReceived):
            return
        st = self.streams.setdefault(event.stream_id, [b"", 0])
        data = event.data
        if len(st[0]) < _HEADER.size:
            need = _HEADER.size - len(st[0])
            st[0] += data[:need]
            data = data[need:]
        st[1] += len(data)
        if not event.end_stream:
            return
        op, size, chunk = _HEADER.unpack(st[0])
        del self.streams[event.stream_id]
        if op == b"U":
            reply = b"OK" if st[1] == size else b"SHORT"
            self._quic.send_stream_data(event.stream_id, reply, end_stream=True)
        else:
            payload = memoryview(os.urandom(min(size, 4 * 1024 * 1024)))
            sent = 0
            while sent < size:
                n = min(chunk, size - sent)
                start = sent % len(payload)
                piece = bytes(payload[start:start + n]) if start + n <= len(payload) else \
                    os.urandom(n)
                sent += n
                self._quic.send_stream_data(event.stream_id, piece, end_stream=sent >= size)
        self.transmit()


async def run_bare_server(port: int, cert: Path, key: Path) -> None:
    await serve("127.0.0.1", port, configuration=server_configuration(cert, key),
                create_protocol=BareServerProtocol)
    print("BARE READY", flush=True)
    await asyncio.Event().wait()


# -- the bare client ------------------------------------------------------------------------------


class BareClientProtocol(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waiters: dict[int, tuple[list[int], asyncio.Future[int]]] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            entry = self.waiters.get(event.stream_id)
            if entry is None:
                return
            entry[0][0] += len(event.data)
            if event.end_stream:
                del self.waiters[event.stream_id]
                entry[1].set_result(entry[0][0])

    def _open(self) -> tuple[int, asyncio.Future[int]]:
        sid = self._quic.get_next_available_stream_id()
        fut: asyncio.Future[int] = self._loop.create_future()
        self.waiters[sid] = ([0], fut)
        return sid, fut

    async def upload(self, data: bytes, chunk: int) -> None:
        sid, fut = self._open()
        self._quic.send_stream_data(sid, _HEADER.pack(b"U", len(data), chunk))
        view = memoryview(data)
        for off in range(0, len(data), chunk):
            piece = bytes(view[off:off + chunk])
            self._quic.send_stream_data(sid, piece, end_stream=off + chunk >= len(data))
            self.transmit()
        got = await fut
        assert got == 2, "bare server reported a short upload"

    async def download(self, size: int, chunk: int) -> None:
        sid, fut = self._open()
        self._quic.send_stream_data(sid, _HEADER.pack(b"D", size, chunk), end_stream=True)
        self.transmit()
        got = await fut
        assert got == size, f"bare download got {got} of {size} bytes"


@contextlib.asynccontextmanager
async def bare_client(port: int, ca: Path) -> AsyncIterator[BareClientProtocol]:
    from qpc_core.client.sdk import client_configuration

    cfg = client_configuration(ca_cert=ca)  # the qpc SDK's flow-control windows
    cfg.alpn_protocols = [BARE_ALPN]
    async with connect("127.0.0.1", port, configuration=cfg,
                       create_protocol=BareClientProtocol) as proto:
        yield proto  # type: ignore[misc]


# -- processes -----------------------------------------------------------------------------


async def start_process(args: list[str], ready: str, env: dict[str, str],
                        timeout: float = 30.0) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    lines: list[str] = []

    async def wait_ready() -> None:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{args[0]} exited:\n" + "".join(lines))
            text = line.decode(errors="replace")
            lines.append(text)
            if ready in text:
                return

    await asyncio.wait_for(wait_ready(), timeout)
    pin(proc.pid, SERVER_CORE)

    async def drain() -> None:  # keep the pipe from filling up
        assert proc.stdout is not None
        while await proc.stdout.readline():
            pass

    proc._bench_drain = asyncio.ensure_future(drain())  # type: ignore[attr-defined]
    return proc


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    drain = getattr(proc, "_bench_drain", None)
    if drain is not None:
        await drain


# -- measurement ---------------------------------------------------------------------------------


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of another process (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def timed(fn: Callable[[], Awaitable[Any]], server_pid: int) -> tuple[float, float, float]:
    """(wall seconds, server CPU seconds, client CPU seconds) of one transfer."""
    s0, c0, t0 = process_cpu(server_pid), own_cpu(), time.perf_counter()
    await fn()
    wall = time.perf_counter() - t0
    return wall, process_cpu(server_pid) - s0, own_cpu() - c0


def reps_for(size: int) -> int:
    return 5 if size <= 5 * MB else 2


async def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from qpc_blobs import client as blobs

    from qpc_core.client import QpcClient

    t_start = time.monotonic()
    pin(0, CLIENT_CORE)
    sizes = [int(s) for s in args.sizes.split(",")]
    chunk = args.chunk
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="qpc-bench-blobs-") as tmp:
        data_dir = Path(tmp) / "data"
        env = {"PATH": os.environ.get("PATH", ""), "QPC_DB_KEY": "bench-blobs-db-key",
               "QPC_METRICS_ENABLED": "false", "QPC_LOG_LEVEL": "INFO"}
        qpc_port = free_udp_port()
        qpc = await start_process(
            [str(BIN / "qpc"), "run", "--plugins", "blobs", "--listen", f"127.0.0.1:{qpc_port}",
             "--data-dir", str(data_dir)], "QUIC listening on", env)
        bare_port = free_udp_port()
        bare = await start_process(
            [sys.executable, str(Path(__file__).resolve()), "--bare-server", str(bare_port),
             str(data_dir / "server-cert.pem"), str(data_dir / "server-key.pem")],
            "BARE READY", env)
        ca = data_dir / "server-cert.pem"
        try:
            client = await QpcClient.connect("127.0.0.1", qpc_port, token="devtoken",
                                             identity=Ed25519PrivateKey.generate(), ca_cert=ca)
            async with client, bare_client(bare_port, ca) as bare_proto:
                # Warm up both connections (congestion windows, code paths).
                warm = os.urandom(2 * MB)
                await blobs.upload(client, warm, chunk_size=chunk)
                await blobs.download(client, blobs_id(warm), None, chunk_size=chunk)
                await bare_proto.upload(warm, chunk)
                await bare_proto.download(len(warm), chunk)
                for size in sizes:
                    if time.monotonic() - t_start > DEADLINE_SECS - 60:
                        print(f"skipping {size} bytes: time budget", file=sys.stderr)
                        continue
                    res: dict[str, list[tuple[float, float, float]]] = {
                        k: [] for k in ("qpc_up", "qpc_down", "bare_up", "bare_down")}
                    for rep in range(reps_for(size)):
                        if rep and time.monotonic() - t_start > DEADLINE_SECS - 4 * size / MB / 3:
                            break  # another repetition would not fit the time budget
                        data = os.urandom(size)  # fresh content: no dedup shortcut
                        bid = blobs_id(data)

                        async def qpc_up(d: bytes = data) -> None:
                            await blobs.upload(client, d, chunk_size=chunk)

                        async def qpc_down(b: bytes = bid) -> None:
                            await blobs.download(client, b, None, chunk_size=chunk)

                        async def bare_up(d: bytes = data) -> None:
                            await bare_proto.upload(d, chunk)

                        async def bare_down(n: int = size) -> None:
                            await bare_proto.download(n, chunk)

                        # Interleaved, so both see the same background load.
                        res["qpc_up"].append(await timed(qpc_up, qpc.pid))
                        res["bare_up"].append(await timed(bare_up, bare.pid))
                        res["qpc_down"].append(await timed(qpc_down, qpc.pid))
                        res["bare_down"].append(await timed(bare_down, bare.pid))
                    rows.append(summarise(size, chunk, res))
        finally:
            await stop_process(bare)
            await stop_process(qpc)
    return rows


def blobs_id(data: bytes) -> bytes:
    import hashlib

    return hashlib.sha256(data).digest()


def summarise(size: int, chunk: int,
              res: dict[str, list[tuple[float, float, float]]]) -> dict[str, Any]:
    def rate(key: str) -> float:
        return size / statistics.median(r[0] for r in res[key]) / MB

    def cpu_per_mb(key: str, side: int) -> float:
        return round(statistics.median(r[side] for r in res[key]) / (size / MB), 4)

    row: dict[str, Any] = {
        "bench": "blobs", "size_bytes": size, "chunk_bytes": chunk, "reps": len(res["qpc_up"]),
        "qpc_upload_MBps": round(rate("qpc_up"), 2),
        "qpc_download_MBps": round(rate("qpc_down"), 2),
        "bare_upload_MBps": round(rate("bare_up"), 2),
        "bare_download_MBps": round(rate("bare_down"), 2),
    }
    row["upload_ratio"] = round(row["qpc_upload_MBps"] / row["bare_upload_MBps"], 3)
    row["download_ratio"] = round(row["qpc_download_MBps"] / row["bare_download_MBps"], 3)
    for key in ("qpc_up", "qpc_down", "bare_up", "bare_down"):
        row[f"{key}_server_cpu_s_per_MB"] = cpu_per_mb(key, 1)
        row[f"{key}_client_cpu_s_per_MB"] = cpu_per_mb(key, 2)
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'size':>10} {'chunk':>8} {'reps':>4} | {'qpc up':>8} {'bare up':>8} {'ratio':>6} "
            f"| {'qpc down':>8} {'bare dn':>8} {'ratio':>6}   (MB/s, median)")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['size_bytes']:>10} {r['chunk_bytes']:>8} {r['reps']:>4} | "
              f"{r['qpc_upload_MBps']:>8.2f} {r['bare_upload_MBps']:>8.2f} "
              f"{r['upload_ratio']:>6.0%} | {r['qpc_download_MBps']:>8.2f} "
              f"{r['bare_download_MBps']:>8.2f} {r['download_ratio']:>6.0%}")
    print("\nCPU seconds per MB (server / client), median: less noisy than MB/s on a busy host")
    for r in rows:
        parts = [f"{k} {r[k + '_server_cpu_s_per_MB']:.3f}/{r[k + '_client_cpu_s_per_MB']:.3f}"
                 for k in ("qpc_up", "bare_up", "qpc_down", "bare_down")]
        print(f"{r['size_bytes']:>10}  " + "  ".join(parts))


def write_results(rows: list[dict[str, Any]]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with RESULTS.open("a") as f:
        for r in rows:
            f.write(json.dumps({"time": stamp, "python": platform.python_version(),
                                "cpus": os.cpu_count(), **r}) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=f"{1 * MB},{50 * MB}", help="blob sizes in bytes")
    p.add_argument("--chunk", type=int, default=256 * 1024, help="chunk size in bytes")
    p.add_argument("--bare-server", nargs=3, metavar=("PORT", "CERT", "KEY"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.bare_server:
        port, cert, key = args.bare_server
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_bare_server(int(port), Path(cert), Path(key)))
        return 0
    ssl.create_default_context()  # fail early if the TLS stack is unusable
    rows = asyncio.run(measure(args))
    print_table(rows)
    write_results(rows)
    print(f"\nappended {len(rows)} rows to {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
