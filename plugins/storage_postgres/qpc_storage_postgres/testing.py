"""A real, throw-away PostgreSQL server for tests and benchmarks (initdb + pg_ctl on a free
port), for this plugin's suite and for anyone testing against it.

PostgreSQL refuses to run as root, so when the tests run as root the server runs as the
``postgres`` system user (created by Debian's packages).  Password authentication (SCRAM)
on 127.0.0.1 only, as a production deployment would use.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "qpc"


def _binary(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                                                   reverse=True)), None)
    if not found:
        raise RuntimeError(
            f"PostgreSQL server binary {name!r} not found (install Debian's 'postgresql' "
            "package; `make test` does that via scripts/system-deps.sh when run as root)"
        )
    return found


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """``fsync=False`` (tests) trades durability for speed; benchmarks keep PostgreSQL's
    durable defaults."""

    def __init__(self, *, fsync: bool = False) -> None:
        self.fsync = fsync
        self.password = secrets.token_hex(12)
        self.port = _free_tcp_port()
        self.dir = Path(tempfile.mkdtemp(prefix="qpc-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self._as_user: str | None = None
        if os.geteuid() == 0:
            self._as_user = "postgres"
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.dir.chmod(0o700)

    def _run(self, *cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True, text=True, user=self._as_user,
                       cwd=self.dir, timeout=120)

    def start(self) -> None:
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password + "\n")
        if self._as_user:
            pw = pwd.getpwnam(self._as_user)
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        try:
            self._run(_binary("initdb"), "-D", str(self.data), "-U", USER, "--auth=scram-sha-256",
                      f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync")
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"initdb failed: {e.stderr}") from e
        pwfile.unlink()
        try:
            self._pg_start()
        except subprocess.CalledProcessError as e:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {e.stderr}\n{log[-2000:]}") from e

    def _pg_start(self) -> None:
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} "
                f"-c fsync={'on' if self.fsync else 'off'} -c max_connections=200")
        self._run(_binary("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts,
                  "-w", "-t", "60", "start")

    @property
    def pid(self) -> int:
        """The postmaster's pid (its children are the connection backends)."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        try:
            self._run(_binary("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        except (subprocess.CalledProcessError, RuntimeError):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def restart(self) -> None:
        """Stop (fast: open connections are cut) and start again on the same port."""
        self._run(_binary("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        self._pg_start()
