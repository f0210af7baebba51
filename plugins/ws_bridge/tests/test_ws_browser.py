"""A real browser (Debian's headless Chromium) using the bridge through the served qpc.js: an
Ed25519 identity made and proven in WebCrypto, messages both ways with a QUIC client, a push,
a cancelled long poll, and a page of another origin refused."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from ws_helpers import bridge, bridge_settings, page_server, until, ws_url

from qpc_core.app import App
from qpc_core.pb import delivery_pb2
from qpc_core.testing import TEST_TOKEN
from qpc_core.testing_chromium import CHROMIUM, chromium

pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None,
                                reason="chromium is not installed (make system-deps installs it)")


def write_page(root: Path, app: App) -> None:
    root.mkdir(parents=True, exist_ok=True)
    js = ws_url(app, "/v1/ws/qpc.js").replace("ws://", "http://", 1)
    (root / "index.html").write_text(
        f'<!doctype html><title>qpc</title><script src="{js}"></script><p>ready</p>')


HEX = "(b) => Array.from(b).map((x) => x.toString(16).padStart(2, '0')).join('')"
UNHEX = "(h) => Uint8Array.from(h.match(/../g).map((x) => parseInt(x, 16)))"


async def test_browser_client_through_the_bridge(app_factory, connect, tmp_path) -> None:
    good, other = tmp_path / "good", tmp_path / "other"
    with page_server(good) as origin, page_server(other) as other_origin:
        app = await app_factory(**bridge_settings(allowed_origins=[origin]))
        write_page(good, app)
        write_page(other, app)
        quic = await connect(app)
        url = json.dumps(ws_url(app))
        async with chromium(tmp_path / "profile") as page:
            await page.goto(origin + "/index.html")
            key_hex = await page.evaluate(f"""(async () => {{
                const hex = {HEX};
                const me = await Qpc.generateIdentity();
                const s = await Qpc.QpcSocket.connect({url}, {{token: {json.dumps(TEST_TOKEN)}}});
                await s.proveIdentity(me);
                window.qs = s;
                window.pushes = [];
                const who = await s.whoami();
                if (hex(who.identityKey) !== hex(me.publicKey)) throw new Error("whoami");
                return hex(me.publicKey);
            }})()""")
            browser_key = bytes.fromhex(key_hex)
            assert {c.identity_key for c in bridge(app).conns} == {browser_key}

            # QUIC -> browser, through a long poll the browser has waiting.
            polling = asyncio.ensure_future(page.evaluate("""(async () => {
                const msgs = await qs.fetchWait(20000);
                return msgs.map((m) => [m.seq.toString(), new TextDecoder().decode(m.data)]);
            })()"""))
            conn = next(iter(bridge(app).conns))
            await until(lambda: conn.calls)
            sent = await quic.enqueue(browser_key, b"hello browser")
            assert await asyncio.wait_for(polling, 20) == [[str(sent.seq), "hello browser"]]

            # Browser -> QUIC, with a delivery proof the QUIC side verifies.
            res = await page.evaluate(f"""(async () => {{
                const hex = {HEX}, unhex = {UNHEX};
                const r = await qs.enqueue(unhex({json.dumps(quic.identity_key.hex())}),
                                           new TextEncoder().encode("hello quic"));
                return [r.seq.toString(), hex(r.proof), r.duplicate];
            }})()""")
            seq, proof_hex, duplicate = res
            assert not duplicate
            await quic.verify_proof(
                delivery_pb2.EnqueueResponse(seq=int(seq), delivery_proof=bytes.fromhex(proof_hex)),
                quic.identity_key, b"", b"hello quic")
            assert [(m.seq, m.data) for m in await quic.fetch()] == [(int(seq), b"hello quic")]

            # A push (NEW_MESSAGE) when no long poll waits.
            await page.evaluate("qs.onpush = (ev, payload) => pushes.push(ev); true")
            await quic.enqueue(browser_key, b"second")
            assert await page.evaluate("""new Promise((resolve, reject) => {
                const t = setInterval(() => { if (pushes.length) { clearInterval(t);
                    resolve(pushes[0]); } }, 10);
                setTimeout(() => reject(new Error("no push")), 15000);
            })""") == 1
            got = await page.evaluate("""(async () => (await qs.fetch()).map(
                (m) => new TextDecoder().decode(m.data)))()""")
            assert got == ["second"]

            # A long poll the page abandons (AbortController) ends on the server too.
            aborted = await page.evaluate("""(async () => {
                const ac = new AbortController();
                const p = qs.fetchWait(30000, {signal: ac.signal});
                setTimeout(() => ac.abort(new Error("user left")), 200);
                try { await p; return "answered"; } catch (e) { return e.message; }
            })()""")
            assert aborted == "user left"
            await until(lambda: not conn.running)

            # Calls that cannot be answered fail at once instead of hanging.
            edge = await page.evaluate(f"""(async () => {{
                const out = {{}};
                try {{ Qpc.pbEncode([[4, -1]]); out.negative = "encoded"; }}
                catch (e) {{ out.negative = e.name; }}
                const s2 = await Qpc.QpcSocket.connect({url});
                await s2.health();
                try {{ await s2.authenticate("devtoken"); out.late = "ok"; }}
                catch (e) {{ out.late = e.code; }}
                try {{ await s2.authenticate("x".repeat(70000)); out.long = "ok"; }}
                catch (e) {{ out.long = e.code; }}
                s2.close();
                await s2.closed;
                try {{ await s2.health(); out.closed = "answered"; }}
                catch (e) {{ out.closed = e.code; }}
                return out;
            }})()""")
            assert edge == {"negative": "RangeError", "late": "PROTOCOL_ERROR",
                            "long": "BAD_REQUEST", "closed": "CLOSED"}

            # A page of an origin the bridge does not allow cannot connect.
            await page.goto(other_origin + "/index.html")
            refused = await page.evaluate(f"""(async () => {{
                try {{ await Qpc.QpcSocket.connect({url}, {{token: "x"}}); return "connected"; }}
                catch (e) {{ return e.code; }}
            }})()""")
            assert refused == "CONNECT"
            assert bridge(app).refused == {"origin": 1}
