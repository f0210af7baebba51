"""Password registration and login from a real browser (Debian's headless Chromium): the
served qpc-opaque.js reproduces the RFC 9807 test vectors, registers and logs in through the
bridge against the auth_opaque plugin, and interoperates with the Python SDK both ways,
with the server's default Argon2id key stretching too."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_der_private_key,
)
from qpc_auth_opaque import client as opaque_client
from qpc_auth_opaque import opaque
from ws_helpers import bridge_settings, page_server, ws_url

from qpc_core.app import App
from qpc_core.testing_chromium import CHROMIUM, chromium

pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None,
                                reason="chromium is not installed (make system-deps installs it)")

VECTORS = Path(__file__).resolve().parents[2] / "auth_opaque" / "tests" / "vectors" / \
    "opaque-3dh-ristretto255-sha512.json"
Factory = Callable[..., Any]

#: In the page: hex helpers, and an identity from PKCS#8 bytes (hex) or a new one.
PRELUDE = """
var hex = (b) => Array.from(b).map((x) => x.toString(16).padStart(2, '0')).join('');
var unhex = (h) => Uint8Array.from((h.match(/../g) || []).map((x) => parseInt(x, 16)));
async function identityFrom(pkcs8Hex, publicHex) {
  const privateKey = await crypto.subtle.importKey("pkcs8", unhex(pkcs8Hex), {name: "Ed25519"},
                                                   false, ["sign"]);
  return {privateKey, publicKey: unhex(publicHex)};
}
async function exportIdentity(id) {
  return hex(new Uint8Array(await crypto.subtle.exportKey("pkcs8", id.privateKey)));
}
"""


def write_page(root: Path, app: App) -> None:
    root.mkdir(parents=True, exist_ok=True)
    base = ws_url(app, "/v1/ws").replace("ws://", "http://", 1)
    (root / "index.html").write_text(
        f'<!doctype html><title>qpc</title><script src="{base}/qpc.js"></script>'
        f'<script src="{base}/qpc-opaque.js"></script><p>ready</p>')


def pkcs8(key: Ed25519PrivateKey) -> str:
    return key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption()).hex()


async def test_the_browser_client_reproduces_the_rfc_vectors(
    app_factory: Factory, tmp_path: Path
) -> None:
    vectors = [v for v in json.loads(VECTORS.read_text())
               if v["config"]["Group"] == "ristretto255" and v["config"]["KSF"] == "Identity"
               and v["config"]["Fake"] == "False"]
    assert len(vectors) == 2
    app = await app_factory(**bridge_settings())
    with page_server(tmp_path / "site") as origin:
        write_page(tmp_path / "site", app)
        async with chromium(tmp_path / "profile") as page:
            await page.goto(origin + "/index.html")
            for v in vectors:
                i, o, c = v["inputs"], v["outputs"], v["config"]
                got = await page.evaluate(PRELUDE + f"""(async () => {{
                    const O = QpcOpaque, i = {json.dumps(i)}, ctx = {json.dumps(c["Context"])};
                    const ids = {{}};
                    if (i.client_identity) ids.clientIdentity = unhex(i.client_identity);
                    if (i.server_identity) ids.serverIdentity = unhex(i.server_identity);
                    const reg = O.startRegistration(unhex(i.password),
                                                    {{blind: unhex(i.blind_registration)}});
                    const fin = await O.finalizeRegistration(reg.state,
                        unhex({json.dumps(o["registration_response"])}),
                        {{ksfSpec: "identity", envelopeNonce: unhex(i.envelope_nonce), ...ids}});
                    const lg = O.startLogin(unhex(i.password), {{blind: unhex(i.blind_login),
                        clientNonce: unhex(i.client_nonce),
                        clientKeyshareSeed: unhex(i.client_keyshare_seed)}});
                    const done = await O.finishLogin(lg.state, unhex({json.dumps(o["KE2"])}),
                        {{ksfSpec: "identity", context: unhex(ctx), ...ids}});
                    return {{registration_request: hex(reg.request),
                             registration_upload: hex(fin.record), export_key: hex(fin.exportKey),
                             KE1: hex(lg.ke1), KE3: hex(done.ke3),
                             session_key: hex(done.sessionKey),
                             login_export_key: hex(done.exportKey)}};
                }})()""")
                assert got == {k: o[k] for k in ("registration_request", "registration_upload",
                                                  "export_key", "KE1", "KE3", "session_key")} | {
                    "login_export_key": o["export_key"]}
            # A KE2 whose MAC was changed is refused (the server is not who it claims).
            v = vectors[0]
            err = await page.evaluate(PRELUDE + f"""(async () => {{
                const i = {json.dumps(v["inputs"])}, ke2 = unhex({json.dumps(v["outputs"]["KE2"])});
                ke2[ke2.length - 1] ^= 1;
                const lg = QpcOpaque.startLogin(unhex(i.password), {{blind: unhex(i.blind_login)}});
                try {{ await QpcOpaque.finishLogin(lg.state, ke2, {{ksfSpec: "identity",
                        context: unhex({json.dumps(v["config"]["Context"])})}});
                       return "accepted"; }}
                catch (e) {{ return e.message; }}
            }})()""")
            assert err == "server authentication failed"


@pytest.mark.parametrize("ksf", ["identity", "argon2id"])
async def test_register_and_log_in_from_a_browser(
    app_factory: Factory, connect: Factory, tmp_path: Path, ksf: str
) -> None:
    """The browser registers alice and logs in; the Python SDK logs in as alice with the
    key the browser made (and the other way round for bob): both implementations agree on
    every byte, the KSF included.  ``argon2id`` is the server's default."""
    py_ksf = opaque.IdentityKSF() if ksf == "identity" else opaque.Argon2idKSF()
    with page_server(tmp_path / "site") as origin:
        settings = bridge_settings(allowed_origins=[origin])
        settings["plugins"] = ["ws_bridge", "auth_opaque"]
        app = await app_factory(**settings, auth_opaque={"ksf": ksf})
        write_page(tmp_path / "site", app)
        bob_key = Ed25519PrivateKey.generate()
        bob = await connect(app, token=None, identity=bob_key)
        await opaque_client.register(bob, "bob", "bobs password", ksf=py_ksf)
        url = json.dumps(ws_url(app))
        async with chromium(tmp_path / "profile") as page:
            await page.goto(origin + "/index.html")
            out = await page.evaluate(PRELUDE + f"""(async () => {{
                const opts = {{ksf: {json.dumps(ksf)}}};
                const me = await Qpc.generateIdentity();
                const s = await Qpc.QpcSocket.connect({url});
                const exportKey = await s.register("Alice", "correct horse", me, opts);
                let wrong;
                try {{ await s.login("alice", "wrong horse", me, opts); wrong = "logged in"; }}
                catch (e) {{ wrong = e.code; }}
                const res = await s.login("alice", "correct horse", me, opts);
                const who = await s.whoami();
                const s2 = await Qpc.QpcSocket.connect({url}, {{token: res.sessionToken}});
                const who2 = await s2.whoami();
                const bobId = await identityFrom({json.dumps(pkcs8(bob_key))},
                                                 {json.dumps(bob.identity_key.hex())});
                const s3 = await Qpc.QpcSocket.connect({url});
                const bobRes = await s3.login("bob", "bobs password", bobId, opts);
                const who3 = await s3.whoami();
                let taken;
                try {{ await s.register("carol", "pw", me, {{ksf: "identity"}}); taken = "ok"; }}
                catch (e) {{ taken = e.code; }}
                return {{wrong, exportEqual: hex(exportKey) === hex(res.exportKey),
                         who: [who.authKind, who.username,
                               hex(who.identityKey) === hex(me.publicKey)],
                         who2: [who2.authKind, who2.username], who3: [who3.authKind, who3.username],
                         bobExport: hex(bobRes.exportKey), pkcs8: await exportIdentity(me),
                         publicKey: hex(me.publicKey), taken}};
            }})()""")
    assert out["wrong"] == "UNAUTHENTICATED"
    assert out["exportEqual"]
    assert out["who"] == ["session", "alice", True]
    assert out["who2"] == ["session", "alice"]
    assert out["who3"] == ["session", "bob"]
    assert out["taken"] == "CONFLICT"  # the identity key is alice's already
    # The Python SDK logs in as the user the browser registered, with the browser's key.
    alice_key = load_der_private_key(bytes.fromhex(out["pkcs8"]), None)
    assert isinstance(alice_key, Ed25519PrivateKey)
    alice = await connect(app, token=None, identity=alice_key)
    res = await opaque_client.login(alice, "alice", "correct horse", ksf=py_ksf)
    assert res.session_token and (await alice.whoami()).username == "alice"
    # ... and the browser logged in as the user the SDK registered: the same export key.
    again = await opaque_client.login(bob, "bob", "bobs password", ksf=py_ksf)
    assert again.export_key.hex() == out["bobExport"]


async def test_bad_arguments_fail_before_anything_is_sent(
    app_factory: Factory, tmp_path: Path
) -> None:
    """A password that is not a non-empty string (a number, the <input> element itself)
    is a TypeError, never read as "": an empty password would give anyone the account's
    export key.  Unknown or mistyped options fail the same way, before any call (so they
    cost no login attempt), and names are read as the server reads them."""
    with page_server(tmp_path / "site") as origin:
        settings = bridge_settings(allowed_origins=[origin])
        settings["plugins"] = ["ws_bridge", "auth_opaque"]
        app = await app_factory(**settings, auth_opaque={"ksf": "identity"})
        write_page(tmp_path / "site", app)
        url = json.dumps(ws_url(app))
        async with chromium(tmp_path / "profile") as page:
            await page.goto(origin + "/index.html")
            out = await page.evaluate(PRELUDE + f"""(async () => {{
                const me = await Qpc.generateIdentity();
                const s = await Qpc.QpcSocket.connect({url});
                const input = document.createElement("input");
                input.value = "hunter2";
                const opts = {{ksf: "identity"}};
                const tries = [["pin", () => s.register("alice", 482916, me, opts)],
                               ["element", () => s.register("alice", input, me, opts)],
                               ["empty", () => s.login("alice", "", me, opts)],
                               ["ksfCase", () => s.login("alice", "pw", me, {{ksf: "Identity"}})],
                               ["unknown", () => s.register("alice", "pw", me,
                                                            {{memoryKib: 8}})],
                               ["name", () => s.register("a", "pw", me, opts)]];
                const out = {{}};
                for (const [k, f] of tries) {{
                  try {{ await f(); out[k] = "sent"; }}
                  catch (e) {{ out[k] = e.name === "TypeError" ? "TypeError" : e.code; }}
                }}
                try {{ QpcOpaque.startRegistration(input); out.lowLevel = "read"; }}
                catch (e) {{ out.lowLevel = e.name; }}
                await s.register("carol\\u001f", "pw", me, opts);  // as the server reads it
                out.carol = (await QpcOpaque.normalizeUsername(" @Carol\\u001f"));
                return out;
            }})()""")
    assert out == {"pin": "TypeError", "element": "TypeError", "empty": "TypeError",
                   "ksfCase": "TypeError", "unknown": "TypeError", "name": "BAD_REQUEST",
                   "lowLevel": "TypeError", "carol": "carol"}
    assert await app.storage.get_user_by_name("carol") is not None
    assert await app.storage.get_user_by_name("alice") is None
    svc = app.state["auth_opaque"]
    assert svc.pending_count == 0  # no LoginStart was sent for the refused logins


async def test_pages_can_pin_the_served_script(app_factory: Factory, tmp_path: Path) -> None:
    """The scripts are served with CORS, so a page can load them with integrity=: the
    right hash loads, a wrong one is refused by the browser."""
    import base64
    import hashlib

    app = await app_factory(**bridge_settings())
    body = bridge_mod_opaque(app)
    good = base64.b64encode(hashlib.sha384(body).digest()).decode()
    bad = base64.b64encode(hashlib.sha384(body + b" ").digest()).decode()
    base = ws_url(app, "/v1/ws").replace("ws://", "http://", 1)
    root = tmp_path / "site"
    root.mkdir()
    for name, digest in (("good", good), ("bad", bad)):
        (root / f"{name}.html").write_text(
            f'<!doctype html><script src="{base}/qpc.js"></script>'
            f'<script src="{base}/qpc-opaque.js" integrity="sha384-{digest}" '
            f'crossorigin="anonymous"></script><p>ready</p>')
    with page_server(root) as origin:
        async with chromium(tmp_path / "profile") as page:
            await page.goto(origin + "/good.html")
            assert await page.evaluate("typeof QpcOpaque") == "object"
            await page.goto(origin + "/bad.html")
            assert await page.evaluate("typeof QpcOpaque") == "undefined"


def bridge_mod_opaque(app: App) -> bytes:
    body = app.state["ws_bridge"]._opaque_js
    assert body is not None
    return bytes(body)
