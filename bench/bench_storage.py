"""Durable enqueues/s with and without group commit (the real SQLCipher store, NORMAL sync).

Usage: python bench/bench_storage.py WORKDIR N  -> one JSON line
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qpc_core.storage.base import NewMessage
from qpc_core.storage.sqlcipher import SqlCipherStorage


async def run(path: Path, n: int, group: bool) -> tuple[float, int]:
    commits = 0

    def observe(op: str, _s: float) -> None:
        nonlocal commits
        if op == "commit":
            commits += 1

    st = await SqlCipherStorage.open(path, "bench", group_commit=group, observer=observe)
    msgs = [NewMessage(bytes([i % 100]) * 32, b"", b"x" * 256, i.to_bytes(16, "big"))
            for i in range(n)]
    t0 = time.perf_counter()
    await asyncio.gather(*(st.enqueue([m], max_depth=10**9, dedup_since=0) for m in msgs))
    el = time.perf_counter() - t0
    await st.close()
    return n / el, commits


async def main(work: Path, n: int) -> None:
    work.mkdir(parents=True, exist_ok=True)
    g, gc = await run(work / "group.db", n, True)
    s, sc = await run(work / "single.db", n, False)
    print(json.dumps({"messages": n, "group_commit_per_sec": round(g, 1),
                      "group_commit_commits": gc, "single_per_sec": round(s, 1),
                      "single_commits": sc, "ratio": round(g / s, 2)}))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2])))
