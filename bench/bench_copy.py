"""How long `qpc store copy` takes (the downtime of a move to PostgreSQL), as records/s.

A SQLCipher store holding N queued 256-byte messages (each with a dedup id) over 200 inboxes
plus a few users and plugin records is copied, read back and verified:

* SQLCipher -> SQLCipher (a new file): the baseline, same run, embedded engine on both ends;
* SQLCipher -> PostgreSQL (a local PostgreSQL 15 server, durable defaults);
* PostgreSQL -> SQLCipher (the way back).

Each direction runs ROUNDS times into fresh targets; the median round is reported, with its
ratio to the baseline's median.  Appends one JSON line per direction to results/copy.jsonl
and prints a Markdown table.

Usage: python bench/bench_copy.py [N]   (default 100000; BENCH_QUICK=1: 10000, 1 round)
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qpc_core.storage.base import NewMessage, Storage
from qpc_core.storage.records import copy_store
from qpc_core.storage.sqlcipher import SqlCipherStorage

QUICK = os.environ.get("BENCH_QUICK") == "1"
ROUNDS = 1 if QUICK else 3
RESULTS = Path(__file__).resolve().parent / "results" / "copy.jsonl"


async def populate(store: Storage, n: int) -> None:
    now = time.time()
    for i in range(20):
        await store.create_user(f"user{i}", bytes([i]) * 32, now=now)
        await store.kv_put("bench", f"k{i}".encode(), b"v" * 64)
    for start in range(0, n, 500):
        batch = [NewMessage(bytes([i % 200]) * 32, b"", os.urandom(256),
                            (start + i).to_bytes(16, "big"))
                 for i in range(min(500, n - start))]
        await store.enqueue(batch, max_depth=10**9, dedup_since=now - 3600)


async def main(n: int) -> list[dict[str, Any]]:
    from qpc_storage_postgres.store import PostgresStorage
    from qpc_storage_postgres.testing import PgServer

    work = Path(tempfile.mkdtemp(prefix="qpc-bench-copy-"))
    pg = PgServer(fsync=True)
    pg.start()
    out: list[dict[str, Any]] = []
    try:
        source = await SqlCipherStorage.open(work / "source.db", "bench")
        await populate(source, n)
        seconds: dict[str, list[float]] = {"sqlcipher->sqlcipher": [],
                                           "sqlcipher->postgres": [],
                                           "postgres->sqlcipher": []}
        records = 0
        for r in range(ROUNDS):
            t1 = await SqlCipherStorage.open(work / f"copy{r}.db", "bench")
            rep = await copy_store(source, t1)
            seconds["sqlcipher->sqlcipher"].append(rep.seconds)
            records = rep.total
            await t1.close()
            pg_target = await PostgresStorage.open(pg.dsn(), schema=f"copy{r}")
            rep = await copy_store(source, pg_target)
            seconds["sqlcipher->postgres"].append(rep.seconds)
            back = await SqlCipherStorage.open(work / f"back{r}.db", "bench")
            rep = await copy_store(pg_target, back)
            seconds["postgres->sqlcipher"].append(rep.seconds)
            await back.close()
            await pg_target.close()
        await source.close()
        base = sorted(seconds["sqlcipher->sqlcipher"])[ROUNDS // 2]
        for direction, secs in seconds.items():
            med = sorted(secs)[ROUNDS // 2]
            out.append({"figure": "store_copy", "direction": direction, "messages": n,
                        "records": records, "rounds": [round(s, 2) for s in secs],
                        "seconds": round(med, 2), "records_per_sec": round(records / med),
                        "ratio_to_sqlcipher_copy": round(base / med, 2),
                        "verified": True, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                              time.gmtime())})
    finally:
        pg.stop()
    return out


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else (10_000 if QUICK else 100_000)
    rows = asyncio.run(main(count))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"`qpc store copy` of {rows[0]['records']:,} records ({count:,} queued messages), "
          f"read back and verified; median of {ROUNDS} rounds\n")
    print("| direction | seconds | records/s | x SQLCipher->SQLCipher (same run) | rounds |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['direction']} | {row['seconds']} | {row['records_per_sec']:,} | "
              f"{row['ratio_to_sqlcipher_copy']} | {', '.join(map(str, row['rounds']))} |")
