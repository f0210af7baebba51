"""Key-transparency log benchmark: append throughput and proof latency vs tree size.

Standalone (no server): the kt_log tree store over the real SQLCipher storage in a temporary
directory.  The tree grows through 10^4, 10^5 and 10^6 leaves (bulk ``append`` batches, then
single-leaf appends, each its own transaction, to land on the exact size); at each size it
times random inclusion and consistency proofs and counts the stored nodes each one reads
(always one ``log_read_many`` round trip).  Then it times whole registrations through
the plugin's service (leaf + index rows + signed tree head) on a fresh database, and finally
(unless ``--no-postgres``) on a shared PostgreSQL store it starts: one server against two
servers appending to one log, and proofs with and without the shared-store freshness read.

    .venv/bin/python bench/bench_kt.py [--sizes 10000,100000,1000000] [--proofs 300]

Prints a table and writes JSON lines to bench/results/kt.jsonl (replaced on each run).
Figures are indicative only; they are never a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "plugins" / "kt_log"))  # usable without `pip install -e`

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from qpc_kt_log.config import KtLogConfig  # noqa: E402
from qpc_kt_log.merkle import verify_consistency, verify_inclusion  # noqa: E402
from qpc_kt_log.records import LeafRecord  # noqa: E402
from qpc_kt_log.service import KtLogService  # noqa: E402
from qpc_kt_log.store import KtTreeStore  # noqa: E402

from qpc_core.storage.sqlcipher import SqlCipherStorage  # noqa: E402

DB_KEY = "bench-kt-key"
SINGLE_APPENDS = 200


def record(i: int) -> LeafRecord:
    key = i.to_bytes(32, "big")
    if i % 50 == 49:
        return LeafRecord.revocation(key, "compromised", timestamp_ms=i)
    return LeafRecord.binding(f"user{i}", key, timestamp_ms=i)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def grow(tree: KtTreeStore, target: int, batch: int) -> dict[str, float]:
    """Grow to ``target`` leaves: bulk batches, then SINGLE_APPENDS one-leaf transactions."""
    bulk_to = max(tree.size, target - SINGLE_APPENDS)
    n_bulk = bulk_to - tree.size
    t0 = time.perf_counter()
    while tree.size < bulk_to:
        start = tree.size
        await tree.append([record(i) for i in range(start, min(bulk_to, start + batch))])
    bulk_s = time.perf_counter() - t0
    n_single = target - tree.size
    t0 = time.perf_counter()
    while tree.size < target:
        await tree.append([record(tree.size)])
    single_s = time.perf_counter() - t0
    return {"bulk_leaves": n_bulk, "bulk_per_s": n_bulk / bulk_s if bulk_s else 0.0,
            "single_appends": n_single,
            "single_per_s": n_single / single_s if single_s else 0.0}


async def time_proofs(tree: KtTreeStore, size: int, count: int, kind: str,
                      rng: random.Random) -> dict[str, float]:
    root = tree.root()
    old_roots: dict[int, bytes] = {}
    lat: list[float] = []
    nodes: list[int] = []
    fetched: list[int] = []
    batches = 0
    for _ in range(count):
        if kind == "inclusion":
            index = rng.randrange(size)
            before = tree.stats.snapshot()
            t0 = time.perf_counter()
            proof = await tree.inclusion_proof(index, size)
            lat.append(time.perf_counter() - t0)
            if len(lat) <= 20:
                assert verify_inclusion(record(index).leaf_hash, index, size, proof, root)
        else:
            old = rng.randrange(1, size)
            before = tree.stats.snapshot()
            t0 = time.perf_counter()
            proof = await tree.consistency_proof(old, size)
            lat.append(time.perf_counter() - t0)
            if len(old_roots) < 5:
                old_roots[old] = await tree.root_at(old)
                assert verify_consistency(old, size, old_roots[old], root, proof)
        after = tree.stats.snapshot()
        batches += after[0] - before[0]
        nodes.append(after[1] - before[1])
        fetched.append(after[2] - before[2])
    return {
        "mean_us": statistics.fmean(lat) * 1e6, "p50_us": pct(lat, 0.50) * 1e6,
        "p99_us": pct(lat, 0.99) * 1e6, "nodes_mean": statistics.fmean(nodes),
        "nodes_max": max(nodes), "stored_reads_mean": statistics.fmean(fetched),
        "stored_reads_max": max(fetched), "round_trips_per_proof": batches / count,
    }


async def service_registrations(tmp: Path, count: int) -> dict[str, float]:
    """Whole registrations through the plugin service: leaf, index rows, signed head."""
    storage = await SqlCipherStorage.open(tmp / "svc.db", DB_KEY)
    try:
        app: Any = SimpleNamespace(storage=storage, state={})
        svc = KtLogService(app, KtLogConfig(), Ed25519PrivateKey.generate())
        await svc.start()
        t0 = time.perf_counter()
        for i in range(count):
            await svc.log_binding(f"seq{i}", i.to_bytes(32, "big"))
            await svc.sth()
        seq_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        await asyncio.gather(*(svc.log_binding(f"con{i}", (10**9 + i).to_bytes(32, "big"))
                               for i in range(count)))
        con_s = time.perf_counter() - t0
        assert svc.tree.size == 2 * count
        return {"sequential_per_s": count / seq_s, "concurrent_per_s": count / con_s}
    finally:
        await storage.close()


async def shared_registrations(count: int, rounds: int = 3) -> dict[str, Any]:
    """kt_log on a shared PostgreSQL store (durable settings): ``count`` concurrent
    registrations through one server, then split over two servers appending to the same log
    (they take turns through the advisory lock), and read cost with and without the
    freshness check a shared store adds (one stored-size read per proof).  Rounds
    interleave the layouts; medians."""
    sys.path.insert(0, str(ROOT / "plugins" / "storage_postgres"))
    from qpc_storage_postgres.store import PostgresStorage
    from qpc_storage_postgres.testing import PgServer

    pg = PgServer(fsync=True)
    pg.start()
    one_s: list[float] = []
    two_s: list[float] = []
    read_shared: list[float] = []
    read_local: list[float] = []
    try:
        for r in range(rounds):
            stores = [await PostgresStorage.open(pg.dsn(), schema=f"kt{r}") for _ in range(2)]
            try:
                key = Ed25519PrivateKey.generate()
                svcs = []
                for st in stores:
                    app: Any = SimpleNamespace(storage=st, state={})
                    svc = KtLogService(app, KtLogConfig(), key)
                    await svc.start()
                    svcs.append(svc)
                t0 = time.perf_counter()
                await asyncio.gather(*(svcs[0].log_binding(f"a{i}", (i + 1).to_bytes(32, "big"))
                                       for i in range(count)))
                one_s.append(count / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                await asyncio.gather(*(svcs[i % 2].log_binding(
                    f"b{i}", (10**9 + i).to_bytes(32, "big")) for i in range(count)))
                two_s.append(count / (time.perf_counter() - t0))
                assert (await svcs[1].sth()).tree_size == 2 * count
                for shared, out in ((True, None), (True, read_shared), (False, read_local)):
                    svcs[0].shared = shared  # the first pass warms the node cache
                    t0 = time.perf_counter()
                    for i in range(count):
                        assert await svcs[0].prove_binding(f"a{i}", (i + 1).to_bytes(32, "big"))
                    if out is not None:
                        out.append(count / (time.perf_counter() - t0))
            finally:
                for st in stores:
                    await st.close()
    finally:
        pg.stop()
    return {"one_server_per_s": statistics.median(one_s),
            "two_servers_per_s": statistics.median(two_s),
            "two_over_one": statistics.median(t / o for t, o in zip(two_s, one_s, strict=True)),
            "proofs_per_s_shared": statistics.median(read_shared),
            "proofs_per_s_unshared": statistics.median(read_local),
            "rounds": rounds}


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--proofs", type=int, default=300, help="proofs of each kind per size")
    p.add_argument("--batch", type=int, default=10_000, help="leaves per bulk append")
    p.add_argument("--registrations", type=int, default=500)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kt.jsonl")
    p.add_argument("--no-postgres", action="store_true",
                   help="skip the shared PostgreSQL store rows")
    args = p.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    rng = random.Random(1234)
    started = time.perf_counter()
    meta = {"python": platform.python_version(), "machine": platform.machine(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-kt-") as tmpdir:
        tmp = Path(tmpdir)
        storage = await SqlCipherStorage.open(tmp / "kt.db", DB_KEY)
        try:
            tree = KtTreeStore(storage)
            await tree.load()
            for size in sizes:
                appends = await grow(tree, size, args.batch)
                reload_t0 = time.perf_counter()
                fresh = KtTreeStore(storage)
                await fresh.load()
                assert fresh.root() == tree.root()
                load_ms = (time.perf_counter() - reload_t0) * 1000
                row: dict[str, Any] = {"bench": "kt", "size": size, "log2": math.log2(size),
                                       **meta, "appends": appends, "load_ms": load_ms}
                # Uncached: every proof reads all its nodes (shows the O(log n) cost).
                cold = KtTreeStore(storage, cache_nodes=0)
                await cold.load()
                for kind in ("inclusion", "consistency"):
                    row[kind] = await time_proofs(cold, size, args.proofs, kind, rng)
                # With the default node cache, after a warm-up of as many random proofs.
                warm = KtTreeStore(storage)
                await warm.load()
                for kind in ("inclusion", "consistency"):
                    await time_proofs(warm, size, args.proofs, kind, rng)
                    row[f"{kind}_cached"] = await time_proofs(warm, size, args.proofs, kind,
                                                              rng)
                db_bytes = sum(f.stat().st_size for f in tmp.glob("kt.db*"))
                row["db_mb"] = db_bytes / 1e6
                rows.append(row)
                print(f"  .. {size:>9,} leaves done at {time.perf_counter() - started:6.1f}s",
                      file=sys.stderr)
        finally:
            await storage.close()
        reg = await service_registrations(tmp, args.registrations)
        rows.append({"bench": "kt_service", **meta, "registrations": args.registrations,
                     **reg})
    shared = None if args.no_postgres else await shared_registrations(args.registrations)
    if shared is not None:
        rows.append({"bench": "kt_shared_postgres", **meta,
                     "registrations": args.registrations, **shared})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")

    hdr = (f"{'leaves':>9} {'log2':>4} | {'bulk/s':>7} {'tx/s':>5} | "
           f"{'incl p50':>8} {'p99':>6} {'nodes':>5} | {'cons p50':>8} {'p99':>6} "
           f"{'nodes':>5} | {'cached incl':>11} {'reads':>5} {'cons':>6} {'reads':>5} | "
           f"{'load':>5} {'MB':>5}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if r["bench"] != "kt":
            continue
        a, i, c = r["appends"], r["inclusion"], r["consistency"]
        ic, cc = r["inclusion_cached"], r["consistency_cached"]
        print(f"{r['size']:>9,} {r['log2']:>4.1f} | {a['bulk_per_s']:>7,.0f} "
              f"{a['single_per_s']:>5,.0f} | {i['p50_us']:>6.0f}µs {i['p99_us']:>4.0f}µs "
              f"{i['stored_reads_mean']:>5.1f} | {c['p50_us']:>6.0f}µs {c['p99_us']:>4.0f}µs "
              f"{c['stored_reads_mean']:>5.1f} | {ic['p50_us']:>9.0f}µs "
              f"{ic['stored_reads_mean']:>5.1f} {cc['p50_us']:>4.0f}µs "
              f"{cc['stored_reads_mean']:>5.1f} | {r['load_ms']:>3.0f}ms {r['db_mb']:>5.0f}")
    print("bulk/s: leaves/s appended in batches; tx/s: one-leaf appends, one transaction each; "
          "nodes/reads: stored node hashes read\nper proof (mean; one storage round trip per "
          "proof, none when all are cached); load: restart (size + frontier)")
    print(f"service registrations (leaf + index rows + signed head): "
          f"{reg['sequential_per_s']:,.0f}/s sequential, {reg['concurrent_per_s']:,.0f}/s "
          f"with {args.registrations} concurrent callers")
    if shared is not None:
        print(f"shared PostgreSQL store, {args.registrations} concurrent registrations: one "
              f"server {shared['one_server_per_s']:,.0f}/s, two servers appending to one log "
              f"{shared['two_servers_per_s']:,.0f}/s ({shared['two_over_one']:.2f} x); "
              f"proofs {shared['proofs_per_s_shared']:,.0f}/s with the shared-store freshness "
              f"read, {shared['proofs_per_s_unshared']:,.0f}/s without (median of "
              f"{shared['rounds']} rounds)")
    print(f"total {time.perf_counter() - started:.1f}s; JSON lines in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
