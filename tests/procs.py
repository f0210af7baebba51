"""Run a real ``qpc run`` server process for tests (readiness from its log, never sleeps)."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
READY = re.compile(r"QUIC listening on ([\d.]+):(\d+)")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    data_dir: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: asyncio.subprocess.Process | None = None
    log: list[str] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 30.0) -> None:
        if not self.port:
            self.port = free_udp_port()
        env = {"PATH": os.environ.get("PATH", ""), "QPC_DB_KEY": "proc-test-key",
               "QPC_METRICS_ENABLED": "false", **self.env}
        self.proc = await asyncio.create_subprocess_exec(
            str(BIN / "qpc"), "run", "--listen", f"127.0.0.1:{self.port}",
            "--data-dir", str(self.data_dir), *self.args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
        )
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.ensure_future(self._read(ready))
        await asyncio.wait_for(ready, timeout)

    async def _read(self, ready: asyncio.Future[None]) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                if not ready.done():
                    ready.set_exception(RuntimeError("server exited:\n" + "".join(self.log)))
                return
            text = line.decode(errors="replace")
            self.log.append(text)
            if not ready.done() and READY.search(text):
                ready.set_result(None)

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()
        if self._reader:
            await self._reader

    async def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.terminate()
        rc = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader:
            await self._reader
        return rc

    @property
    def ca(self) -> Path:
        return self.data_dir / "server-cert.pem"
