"""The baseline: a bare aioquic server that echoes each bidi stream back (with FIN).

Same TLS certificate type, ALPN and stream pattern as qpc, no framing work, no storage.
Usage: python bench/echo_server.py PORT CERT_DIR
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent, StreamDataReceived

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qpc_core.transport.certs import resolve_tls


class Echo(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buffers: dict[int, bytearray] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived) and not event.stream_id & 0x2:
            buf = self.buffers.setdefault(event.stream_id, bytearray())
            buf += event.data
            if event.end_stream:
                del self.buffers[event.stream_id]
                self._quic.send_stream_data(event.stream_id, bytes(buf), end_stream=True)
                self.transmit()


async def main(port: int, cert_dir: Path) -> None:
    tls = resolve_tls(cert_dir, None, None, production=False)
    cfg = QuicConfiguration(is_client=False, alpn_protocols=["qpc"], idle_timeout=300,
                            max_data=16 * 1024 * 1024, max_stream_data=4 * 1024 * 1024)
    cfg.certificate = tls.certificate
    cfg.private_key = tls.private_key
    await serve("127.0.0.1", port, configuration=cfg, create_protocol=Echo)
    print(f"QUIC listening on 127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), Path(sys.argv[2])))
