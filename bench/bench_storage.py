"""Durable enqueues/s with and without group commit (the real SQLCipher store).

Reported for synchronous=NORMAL (the default: WAL commits survive a process crash, the WAL is
fsynced at checkpoints) and synchronous=FULL (every commit fsynced: durable across power
loss), since "durable" differs between the two.

Each configuration runs ROUNDS times on fresh files and the median round is reported (a
single round swings by +-25% on these shared machines).

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


async def run(path: Path, n: int, group: bool, sync: str) -> tuple[float, int]:
    commits = 0

    def observe(op: str, _s: float) -> None:
        nonlocal commits
        if op == "commit":
            commits += 1

    st = await SqlCipherStorage.open(path, "bench", group_commit=group, observer=observe,
                                     synchronous=sync)
    msgs = [NewMessage(bytes([i % 100]) * 32, b"", b"x" * 256, i.to_bytes(16, "big"))
            for i in range(n)]
    t0 = time.perf_counter()
    await asyncio.gather(*(st.enqueue([m], max_depth=10**9, dedup_since=0) for m in msgs))
    el = time.perf_counter() - t0
    await st.close()
    return n / el, commits


ROUNDS = 5


async def main(work: Path, n: int) -> None:
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, object] = {"messages": n, "rounds": ROUNDS}
    for sync in ("NORMAL", "FULL"):
        rounds = []
        for i in range(ROUNDS):  # alternate the two modes so drift hits both alike
            g, gc = await run(work / f"group-{sync}-{i}.db", n, True, sync)
            s, sc = await run(work / f"single-{sync}-{i}.db", n, False, sync)
            rounds.append((g / s, g, gc, s, sc))
        ratio, g, gc, s, sc = sorted(rounds)[ROUNDS // 2]
        suffix = "" if sync == "NORMAL" else "_full"
        out.update({f"group_commit_per_sec{suffix}": round(g, 1),
                    f"group_commit_commits{suffix}": gc, f"single_per_sec{suffix}": round(s, 1),
                    f"single_commits{suffix}": sc, f"ratio{suffix}": round(ratio, 2),
                    f"ratio_rounds{suffix}": [round(r[0], 2) for r in rounds]})
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2])))
