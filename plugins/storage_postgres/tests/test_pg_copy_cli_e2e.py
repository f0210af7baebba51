"""The scaling guide's move from SQLCipher to PostgreSQL, end to end: a real `qpc run` on
SQLCipher accepts messages, `qpc store copy --to postgres` moves the store, and a real
`qpc run` on PostgreSQL delivers them under the same seqs, signs with the same delivery-proof
key (clients pinned it), continues the seqs, logs in the users registered before and extends
the same key-transparency log."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from qpc_auth_opaque import client as oc
from qpc_auth_opaque import opaque
from qpc_kt_log import client as kt

from qpc_core.client.sdk import QpcClient
from qpc_core.testing import BIN, ServerProcess, process_client

pytestmark = pytest.mark.timeout(180)


async def qpc(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "qpc"), *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": os.environ.get("PATH", ""), "QPC_DB_KEY": "proc-test-key", **env})
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_qpc_store_copy_moves_a_live_deployment_to_postgres(tmp_path: Path,
                                                                   pg_dsn: str) -> None:
    data = tmp_path / "data"
    env = {"QPC_POSTGRES_DSN": pg_dsn}
    srv = ServerProcess(data, args=["--plugins", "auth_opaque,kt_log"])
    await srv.start()
    # A registered user: the OPAQUE records and the server's OPAQUE keys must move too.
    dora = Ed25519PrivateKey.generate()
    c = await QpcClient.connect("127.0.0.1", srv.port, token=None, identity=dora,
                                ca_cert=srv.ca)
    export_key = await oc.register(c, "dora", "correct horse", ksf=opaque.IdentityKSF())
    await c.close()
    sender = await process_client(srv)
    receiver = await process_client(srv)
    rid, rkey = receiver.identity, receiver.identity_key
    assert rid is not None and rkey is not None
    await receiver.close()
    sent = [f"before the move {i}".encode() for i in range(20)]
    seqs = [(await sender.enqueue(rkey, p)).seq for p in sent]  # proofs verified
    assert seqs == list(range(1, 21))
    pinned = await sender.signing_key()
    kt_state = kt.KtState()  # a client that verified @dora in the key-transparency log
    await kt.resolve_verified(sender, "dora", kt_state)
    assert kt_state.tree_size >= 1
    await sender.close()

    # The SQLCipher file is locked by the running server: the copy refuses to start.
    rc, _out, err = await qpc("store", "copy", "--to", "postgres", "--data-dir", str(data),
                              env=env)
    assert rc == 1 and "in use by another qpc process" in err
    assert await srv.terminate() == 0

    rc, out, err = await qpc("store", "copy", "--to", "postgres", "--data-dir", str(data),
                             env=env)
    assert rc == 0, err
    assert "verified: the target reads back identical to the source" in out
    assert re.search(r"^\s+message\s+20$", out, re.M), out
    digest = re.search(r"sha256 ([0-9a-f]{64})", out)
    assert digest is not None
    # Both stores report the same records (an operator's check before switching over).
    for storage in ("sqlcipher", "postgres"):
        rc, out2, err2 = await qpc("store", "stats", "--storage", storage, "--data-dir",
                                   str(data), env=env)
        assert rc == 0, err2
        assert f"sha256 {digest.group(1)}" in out2

    # A second copy into the now filled database is refused.
    rc, _out, err = await qpc("store", "copy", "--to", "postgres", "--data-dir", str(data),
                              env=env)
    assert rc == 1 and "not empty" in err

    # The server on PostgreSQL (fresh data dir: nothing can come from the SQLCipher file).
    srv2 = ServerProcess(tmp_path / "data-pg",
                         args=["--plugins", "postgres,auth_opaque,kt_log"],
                         env={"QPC_STORAGE": "postgres", **env})
    await srv2.start()
    try:
        receiver = await process_client(srv2, identity=rid)
        got = await receiver.fetch()
        assert [(m.seq, m.data) for m in got] == list(zip(seqs, sent, strict=True))
        sender = await process_client(srv2)
        sender.server_signing_key = pinned  # a client that pinned the key before the move
        r = await sender.enqueue(rkey, b"after the move")  # verifies against the pinned key
        assert r.seq == 21
        assert await receiver.signing_key() == pinned
        await receiver.close()
        c = await QpcClient.connect("127.0.0.1", srv2.port, token=None, identity=dora,
                                    ca_cert=srv2.ca)
        login = await oc.login(c, "dora", "correct horse", ksf=opaque.IdentityKSF())
        assert login.export_key == export_key  # same OPAQUE record, same server keys
        await c.close()
        # The key-transparency log continues: a new binding's proof verifies against the
        # pinned log key, and its head is a consistent extension of the one seen before.
        c = await QpcClient.connect("127.0.0.1", srv2.port, token=None,
                                    identity=Ed25519PrivateKey.generate(), ca_cert=srv2.ca)
        await oc.register(c, "erin", "pw", ksf=opaque.IdentityKSF())
        await c.close()
        old_size = kt_state.tree_size
        await kt.resolve_verified(sender, "erin", kt_state)
        await kt.resolve_verified(sender, "dora", kt_state)
        assert kt_state.tree_size > old_size
        await sender.close()
    finally:
        assert await srv2.terminate() == 0
