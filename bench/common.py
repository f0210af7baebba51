"""Shared helpers for the benchmarks: processes, pinning, /proc readings, result files."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def pin(pid: int, core: int | None) -> None:
    if core is not None and len(cores()) > 1:
        os.sched_setaffinity(pid, {core})


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds per thread role of a server process: ``loop`` (the main thread, which
    runs the event loop), ``writer`` (the SQLCipher writer thread) and ``other``."""
    out = {"loop": 0.0, "writer": 0.0, "other": 0.0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        name = stat.split("(", 1)[1].rsplit(")", 1)[0]
        fields = stat.rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / CLK_TCK
        role = ("loop" if int(tid) == pid else
                "writer" if name.startswith("qpc-db-writer") else "other")
        out[role] += seconds
    return out


def rss_bytes(pid: int) -> int:
    m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) * 1024 if m else 0


def wait_for_line(proc: subprocess.Popen[str], pattern: str, timeout: float = 60) -> str:
    """Read the process's output until ``pattern`` appears (bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    rx = re.compile(pattern)
    seen: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("process exited:\n" + "".join(seen))
        seen.append(line)
        if rx.search(line):
            return line
    raise TimeoutError(f"no line matching {pattern!r} within {timeout}s")


def run_json(cmd: list[str], core: int | None = None, timeout: float = 600) -> Any:
    """Run a load-generator command pinned to ``core`` and parse its last JSON line."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pin(proc.pid, core)
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": len(cores()), "python": sys.version.split()[0]}


def write_jsonl(name: str, rows: list[dict[str, Any]]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.jsonl"
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path
