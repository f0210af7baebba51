"""The ``qpc`` and ``qpc-server`` console entry points, kept free of heavy imports.

``qpc run`` reloads its certificates on SIGHUP, but the handler exists only once the event loop
runs; until then SIGHUP's default action would end the process (a ``systemctl reload`` racing a
start), and systemd does not restart a unit that died of SIGHUP.  So a server ignores SIGHUP
from its first Python statement on, before importing anything large; the server installs its
handler before it reads any certificate, so a signal ignored meanwhile misses nothing.
"""

from __future__ import annotations

import signal
import sys


def _ignore_sighup() -> None:
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def main() -> int:
    if sys.argv[1:2] == ["run"]:
        _ignore_sighup()
    from qpc_core.cli import main as cli_main

    return cli_main()


def server_main() -> None:
    _ignore_sighup()
    from qpc_core.cli import server_main as cli_server_main

    cli_server_main()
