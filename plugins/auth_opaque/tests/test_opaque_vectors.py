"""RFC 9807 test vectors (OPAQUE-3DH, ristretto255-SHA512) and behavioural tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qpc_auth_opaque import opaque
from qpc_auth_opaque.opaque import (
    KE1,
    KE2,
    KE3,
    Argon2idKSF,
    AuthRequest,
    AuthResponse,
    ClientAuthenticationError,
    CredentialRequest,
    CredentialResponse,
    Envelope,
    EnvelopeRecoveryError,
    IdentityKSF,
    OpaqueError,
    RegistrationRecord,
    RegistrationRequest,
    RegistrationResponse,
    ServerAuthenticationError,
    ServerLoginState,
    ServerSetup,
    client_finalize_registration,
    client_finish_login,
    client_start_login,
    client_start_registration,
    create_fake_record,
    derive_diffie_hellman_key_pair,
    server_create_registration_response,
    server_finish,
    server_generate_ke2,
)

VECTORS_PATH = Path(__file__).parent / "vectors" / "opaque-3dh-ristretto255-sha512.json"
ALL_VECTORS: list[dict[str, Any]] = json.loads(VECTORS_PATH.read_text())


def _is_target(v: dict[str, Any]) -> bool:
    cfg = v["config"]
    return bool(
        cfg["Group"] == "ristretto255"
        and cfg["OPRF"] == "ristretto255-SHA512"
        and cfg["Hash"] == "SHA512"
        and cfg["KSF"] == "Identity"
        and cfg["Name"] == "3DH"
    )


REAL_VECTORS = [v for v in ALL_VECTORS if _is_target(v) and v["config"]["Fake"] == "False"]
FAKE_VECTORS = [v for v in ALL_VECTORS if _is_target(v) and v["config"]["Fake"] == "True"]


def _h(v: dict[str, Any], section: str, key: str) -> bytes:
    return bytes.fromhex(v[section][key])


def _opt(v: dict[str, Any], key: str) -> bytes | None:
    value = v["inputs"].get(key)
    return None if value is None else bytes.fromhex(value)


def _vector_id(v: dict[str, Any]) -> str:
    ids = "identities" if "client_identity" in v["inputs"] else "no-identities"
    return f"{v['config']['Name']}-{v['config']['Group']}-{ids}"


def test_vector_file_has_expected_content() -> None:
    assert len(REAL_VECTORS) >= 2
    assert len(FAKE_VECTORS) >= 1


# ---------------------------------------------------------------------------
# Real vectors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("v", REAL_VECTORS, ids=[_vector_id(v) for v in REAL_VECTORS])
def test_real_vector(v: dict[str, Any]) -> None:

    def inp(key: str) -> bytes:
        return _h(v, "inputs", key)

    inter = v["intermediates"]
    out = v["outputs"]
    ksf = IdentityKSF()
    context = bytes.fromhex(v["config"]["Context"])
    password = inp("password")
    cred_id = inp("credential_identifier")
    client_identity = _opt(v, "client_identity")
    server_identity = _opt(v, "server_identity")

    setup = ServerSetup(inp("oprf_seed"), inp("server_private_key"), inp("server_public_key"))
    assert ServerSetup.from_private_key(inp("oprf_seed"), inp("server_private_key")) == setup

    # --- registration ------------------------------------------------------
    reg_state, reg_request = client_start_registration(password, blind=inp("blind_registration"))
    assert reg_request.serialize().hex() == out["registration_request"]
    reg_request = RegistrationRequest.deserialize(reg_request.serialize())

    reg_response = server_create_registration_response(setup, reg_request, cred_id)
    assert reg_response.serialize().hex() == out["registration_response"]
    reg_response = RegistrationResponse.deserialize(reg_response.serialize())

    record, export_key_reg = client_finalize_registration(
        reg_state,
        reg_response,
        ksf,
        server_identity=server_identity,
        client_identity=client_identity,
        envelope_nonce=inp("envelope_nonce"),
    )
    assert record.serialize().hex() == out["registration_upload"]
    assert export_key_reg.hex() == out["export_key"]
    record = RegistrationRecord.deserialize(record.serialize())

    # --- login ---------------------------------------------------------------
    login_state, ke1 = client_start_login(
        password,
        blind=inp("blind_login"),
        client_nonce=inp("client_nonce"),
        client_keyshare_seed=inp("client_keyshare_seed"),
    )
    assert ke1.serialize().hex() == out["KE1"]
    ke1 = KE1.deserialize(ke1.serialize())

    ke2, server_state = server_generate_ke2(
        setup,
        record,
        cred_id,
        ke1,
        client_identity=client_identity,
        context=context,
        server_identity=server_identity,
        masking_nonce=inp("masking_nonce"),
        server_nonce=inp("server_nonce"),
        server_keyshare_seed=inp("server_keyshare_seed"),
    )
    assert ke2.serialize().hex() == out["KE2"]
    ke2 = KE2.deserialize(ke2.serialize())

    ke3, client_session_key, export_key = client_finish_login(
        login_state,
        ke2,
        ksf,
        context,
        server_identity=server_identity,
        client_identity=client_identity,
    )
    assert ke3.serialize().hex() == out["KE3"]
    assert client_session_key.hex() == out["session_key"]
    assert export_key.hex() == out["export_key"]

    server_state = ServerLoginState.deserialize(server_state.serialize())
    server_session_key = server_finish(server_state, KE3.deserialize(ke3.serialize()))
    assert server_session_key.hex() == out["session_key"]

    # --- intermediate values (via the module's internal building blocks) ----
    if "oprf_key" in inter:
        assert opaque._derive_oprf_key(setup.oprf_seed, cred_id).hex() == inter["oprf_key"]
    if "client_public_key" in inter:
        assert record.client_public_key.hex() == inter["client_public_key"]
    if "masking_key" in inter:
        assert record.masking_key.hex() == inter["masking_key"]
    if "envelope" in inter:
        assert record.envelope.serialize().hex() == inter["envelope"]

    oprf_output = opaque._oprf_finalize(
        password, inp("blind_registration"), reg_response.evaluated_message
    )
    randomized_password = opaque._randomized_password(oprf_output, ksf)
    if "randomized_password" in inter:
        assert randomized_password.hex() == inter["randomized_password"]
    if "auth_key" in inter:
        keys = opaque._envelope_keys(randomized_password, inp("envelope_nonce"))
        assert keys.auth_key.hex() == inter["auth_key"]

    server_sk_share, server_pk_share = derive_diffie_hellman_key_pair(inp("server_keyshare_seed"))
    assert server_pk_share == ke2.auth_response.server_public_keyshare
    client_keyshare = ke1.auth_request.client_public_keyshare
    ikm = (
        opaque._scalar_mult(server_sk_share, client_keyshare)
        + opaque._scalar_mult(setup.server_private_key, client_keyshare)
        + opaque._scalar_mult(server_sk_share, record.client_public_key)
    )
    preamble = opaque._preamble(
        context,
        record.client_public_key if client_identity is None else client_identity,
        ke1,
        setup.server_public_key if server_identity is None else server_identity,
        ke2.credential_response,
        ke2.auth_response.server_nonce,
        server_pk_share,
    )
    ake = opaque._derive_keys(ikm, preamble)
    if "handshake_secret" in inter:
        assert ake.handshake_secret.hex() == inter["handshake_secret"]
    if "server_mac_key" in inter:
        assert ake.server_mac_key.hex() == inter["server_mac_key"]
    if "client_mac_key" in inter:
        assert ake.client_mac_key.hex() == inter["client_mac_key"]
    assert ake.session_key.hex() == out["session_key"]


# ---------------------------------------------------------------------------
# Fake-record vector
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("v", FAKE_VECTORS, ids=[_vector_id(v) for v in FAKE_VECTORS])
def test_fake_vector_ke2(v: dict[str, Any]) -> None:

    def inp(key: str) -> bytes:
        return _h(v, "inputs", key)

    context = bytes.fromhex(v["config"]["Context"])
    setup = ServerSetup(inp("oprf_seed"), inp("server_private_key"), inp("server_public_key"))
    ke1 = KE1.deserialize(inp("KE1"))

    # The vector's KE1 keyshare comes from client_keyshare_seed.
    _, client_keyshare = derive_diffie_hellman_key_pair(inp("client_keyshare_seed"))
    assert ke1.auth_request.client_public_keyshare == client_keyshare

    fake = create_fake_record(inp("client_private_key"), inp("masking_key"))
    assert fake.client_public_key == inp("client_public_key")
    assert fake.envelope.serialize() == bytes(opaque.NN + opaque.NM)

    kwargs: dict[str, Any] = {
        "client_identity": _opt(v, "client_identity"),
        "context": context,
        "server_identity": _opt(v, "server_identity"),
        "masking_nonce": inp("masking_nonce"),
        "server_nonce": inp("server_nonce"),
        "server_keyshare_seed": inp("server_keyshare_seed"),
    }
    # record=None path with injected fake material ...
    ke2, _ = server_generate_ke2(
        setup,
        None,
        inp("credential_identifier"),
        ke1,
        fake_client_private_key=inp("client_private_key"),
        fake_masking_key=inp("masking_key"),
        **kwargs,
    )
    assert ke2.serialize().hex() == v["outputs"]["KE2"]
    # ... and the same result when the fake record is built explicitly.
    ke2_explicit, _ = server_generate_ke2(setup, fake, inp("credential_identifier"), ke1, **kwargs)
    assert ke2_explicit.serialize() == ke2.serialize()


@pytest.mark.parametrize("v", FAKE_VECTORS, ids=[_vector_id(v) for v in FAKE_VECTORS])
def test_fake_vector_client_finish_fails(v: dict[str, Any]) -> None:

    def inp(key: str) -> bytes:
        return _h(v, "inputs", key)

    context = bytes.fromhex(v["config"]["Context"])
    client_identity = _opt(v, "client_identity")
    server_identity = _opt(v, "server_identity")
    setup = ServerSetup(inp("oprf_seed"), inp("server_private_key"), inp("server_public_key"))

    state, ke1 = client_start_login(
        b"any password", client_keyshare_seed=inp("client_keyshare_seed")
    )
    ke2, server_state = server_generate_ke2(
        setup,
        None,
        inp("credential_identifier"),
        ke1,
        client_identity=client_identity,
        context=context,
        server_identity=server_identity,
        masking_nonce=inp("masking_nonce"),
        server_nonce=inp("server_nonce"),
        server_keyshare_seed=inp("server_keyshare_seed"),
        fake_client_private_key=inp("client_private_key"),
        fake_masking_key=inp("masking_key"),
    )
    with pytest.raises(EnvelopeRecoveryError):
        client_finish_login(
            state,
            ke2,
            IdentityKSF(),
            context,
            server_identity=server_identity,
            client_identity=client_identity,
        )
    # A client that guesses a MAC cannot get in either.
    with pytest.raises(ClientAuthenticationError):
        server_finish(server_state, KE3(bytes(opaque.NM)))


# ---------------------------------------------------------------------------
# Behaviour
# ---------------------------------------------------------------------------

PASSWORD = b"correct horse battery staple"
CRED_ID = b"alice@example"


def _register(
    setup: ServerSetup, password: bytes, ksf: opaque.KSF, **ids: bytes | None
) -> tuple[RegistrationRecord, bytes]:
    state, request = client_start_registration(password)
    response = server_create_registration_response(
        setup, RegistrationRequest.deserialize(request.serialize()), CRED_ID
    )
    return client_finalize_registration(
        state, RegistrationResponse.deserialize(response.serialize()), ksf, **ids
    )


def test_round_trip_identity_ksf_random_inputs() -> None:
    setup = ServerSetup.generate()
    ksf = IdentityKSF()
    record, export_key_reg = _register(setup, PASSWORD, ksf)
    state, ke1 = client_start_login(PASSWORD)
    ke2, server_state = server_generate_ke2(setup, record, CRED_ID, ke1)
    ke3, client_key, export_key = client_finish_login(state, ke2, ksf)
    assert server_finish(server_state, ke3) == client_key
    assert export_key == export_key_reg
    assert len(client_key) == opaque.NX


def test_round_trip_argon2id_ksf() -> None:
    setup = ServerSetup.generate()
    ksf = Argon2idKSF(memory_kib=1024, iterations=1, parallelism=1)
    record, export_key_reg = _register(
        setup, PASSWORD, ksf, server_identity=b"qpc.example", client_identity=b"alice"
    )
    state, ke1 = client_start_login(PASSWORD)
    ke2, server_state = server_generate_ke2(
        setup,
        RegistrationRecord.deserialize(record.serialize()),
        CRED_ID,
        KE1.deserialize(ke1.serialize()),
        client_identity=b"alice",
        server_identity=b"qpc.example",
    )
    ke3, client_key, export_key = client_finish_login(
        state,
        KE2.deserialize(ke2.serialize()),
        ksf,
        server_identity=b"qpc.example",
        client_identity=b"alice",
    )
    server_key = server_finish(server_state, KE3.deserialize(ke3.serialize()))
    assert server_key == client_key
    assert export_key == export_key_reg

    # A client using a different KSF cannot open the envelope.
    state2, ke1b = client_start_login(PASSWORD)
    ke2b, _ = server_generate_ke2(
        setup, record, CRED_ID, ke1b, client_identity=b"alice", server_identity=b"qpc.example"
    )
    with pytest.raises(EnvelopeRecoveryError):
        client_finish_login(
            state2, ke2b, IdentityKSF(), server_identity=b"qpc.example", client_identity=b"alice"
        )


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    password=st.binary(min_size=0, max_size=64),
    client_identity=st.none() | st.binary(max_size=40),
    server_identity=st.none() | st.binary(max_size=40),
    context=st.binary(max_size=40),
)
def test_round_trip_property(
    password: bytes,
    client_identity: bytes | None,
    server_identity: bytes | None,
    context: bytes,
) -> None:
    setup = ServerSetup.generate()
    ksf = IdentityKSF()
    ids = {"client_identity": client_identity, "server_identity": server_identity}
    record, export_key_reg = _register(setup, password, ksf, **ids)
    state, ke1 = client_start_login(password)
    ke2, server_state = server_generate_ke2(setup, record, CRED_ID, ke1, context=context, **ids)
    ke3, client_key, export_key = client_finish_login(state, ke2, ksf, context, **ids)
    assert server_finish(server_state, ke3) == client_key
    assert export_key == export_key_reg


def test_argon2id_ksf_properties() -> None:
    ksf = Argon2idKSF(memory_kib=1024, iterations=1)
    out = ksf.stretch(b"x" * 64)
    assert len(out) == opaque.NH
    assert out == ksf.stretch(b"x" * 64)
    assert out != Argon2idKSF(memory_kib=2048, iterations=1).stretch(b"x" * 64)
    default = Argon2idKSF()
    assert (default.memory_kib, default.iterations, default.parallelism) == (19456, 2, 1)
    assert default.salt == bytes(16)
    assert isinstance(default, opaque.KSF)
    assert default == opaque.DEFAULT_KSF
    with pytest.raises(OpaqueError):
        Argon2idKSF(memory_kib=4)


def test_wrong_password_fails_at_client_finish() -> None:
    setup = ServerSetup.generate()
    ksf = IdentityKSF()
    record, _ = _register(setup, PASSWORD, ksf)
    state, ke1 = client_start_login(b"wrong password")
    ke2, server_state = server_generate_ke2(setup, record, CRED_ID, ke1)
    with pytest.raises(OpaqueError):
        client_finish_login(state, ke2, ksf)
    with pytest.raises(ClientAuthenticationError):
        server_finish(server_state, KE3(bytes(opaque.NM)))


def test_wrong_credential_identifier_fails() -> None:
    setup = ServerSetup.generate()
    ksf = IdentityKSF()
    record, _ = _register(setup, PASSWORD, ksf)
    state, ke1 = client_start_login(PASSWORD)
    ke2, _ = server_generate_ke2(setup, record, b"someone-else", ke1)
    with pytest.raises(EnvelopeRecoveryError):
        client_finish_login(state, ke2, ksf)


def test_mismatched_context_fails_server_mac() -> None:
    setup = ServerSetup.generate()
    ksf = IdentityKSF()
    record, _ = _register(setup, PASSWORD, ksf)
    state, ke1 = client_start_login(PASSWORD)
    ke2, _ = server_generate_ke2(setup, record, CRED_ID, ke1, context=b"other-context")
    with pytest.raises(ServerAuthenticationError):
        client_finish_login(state, ke2, ksf)


def test_mismatched_server_identity_fails() -> None:
    setup = ServerSetup.generate()
    ksf = IdentityKSF()
    record, _ = _register(setup, PASSWORD, ksf, server_identity=b"srv-a")
    state, ke1 = client_start_login(PASSWORD)
    ke2, _ = server_generate_ke2(setup, record, CRED_ID, ke1, server_identity=b"srv-a")
    with pytest.raises(EnvelopeRecoveryError):
        client_finish_login(state, ke2, ksf, server_identity=b"srv-b")


def test_tampered_ke2_server_mac_fails() -> None:
    setup = ServerSetup.generate()
    ksf = IdentityKSF()
    record, _ = _register(setup, PASSWORD, ksf)
    state, ke1 = client_start_login(PASSWORD)
    ke2, _ = server_generate_ke2(setup, record, CRED_ID, ke1)
    raw = bytearray(ke2.serialize())
    raw[-1] ^= 0x01
    with pytest.raises(ServerAuthenticationError):
        client_finish_login(state, KE2.deserialize(bytes(raw)), ksf)


def test_tampered_ke2_masked_response_fails() -> None:
    setup = ServerSetup.generate()
    ksf = IdentityKSF()
    record, _ = _register(setup, PASSWORD, ksf)
    state, ke1 = client_start_login(PASSWORD)
    ke2, _ = server_generate_ke2(setup, record, CRED_ID, ke1)
    raw = bytearray(ke2.serialize())
    raw[opaque.NOE + opaque.NN + opaque.NPK + 5] ^= 0x80  # inside the envelope
    with pytest.raises(EnvelopeRecoveryError):
        client_finish_login(state, KE2.deserialize(bytes(raw)), ksf)


@pytest.mark.parametrize("position", [0, 31, 63])
def test_tampered_ke3_fails_at_server_finish(position: int) -> None:
    setup = ServerSetup.generate()
    ksf = IdentityKSF()
    record, _ = _register(setup, PASSWORD, ksf)
    state, ke1 = client_start_login(PASSWORD)
    ke2, server_state = server_generate_ke2(setup, record, CRED_ID, ke1)
    ke3, _, _ = client_finish_login(state, ke2, ksf)
    raw = bytearray(ke3.serialize())
    raw[position] ^= 0x01
    with pytest.raises(ClientAuthenticationError):
        server_finish(server_state, KE3.deserialize(bytes(raw)))
    with pytest.raises(OpaqueError):  # ClientAuthenticationError is an OpaqueError
        server_finish(server_state, KE3.deserialize(bytes(raw)))


def test_fake_record_ke2_has_same_length_as_real() -> None:
    setup = ServerSetup.generate()
    ksf = IdentityKSF()
    record, _ = _register(setup, PASSWORD, ksf)
    _, ke1 = client_start_login(PASSWORD)
    real_ke2, _ = server_generate_ke2(setup, record, CRED_ID, ke1)
    fake_ke2, _ = server_generate_ke2(setup, None, b"unknown-user", ke1)
    assert len(fake_ke2.serialize()) == len(real_ke2.serialize()) == KE2.SIZE == 320
    # And it parses as a well-formed KE2.
    assert KE2.deserialize(fake_ke2.serialize()) == fake_ke2
    # Fake records are random per call.
    fake_ke2_again, _ = server_generate_ke2(setup, None, b"unknown-user", ke1)
    assert fake_ke2_again.serialize() != fake_ke2.serialize()


def test_unknown_user_client_fails() -> None:
    setup = ServerSetup.generate()
    state, ke1 = client_start_login(PASSWORD)
    ke2, _ = server_generate_ke2(setup, None, b"nobody", ke1)
    with pytest.raises(EnvelopeRecoveryError):
        client_finish_login(state, ke2, IdentityKSF())


# --- serialization / validation ---------------------------------------------

MESSAGE_TYPES: list[tuple[type[Any], int]] = [
    (RegistrationRequest, 32),
    (RegistrationResponse, 64),
    (RegistrationRecord, 192),
    (Envelope, 96),
    (CredentialRequest, 32),
    (AuthRequest, 64),
    (KE1, 96),
    (CredentialResponse, 192),
    (AuthResponse, 128),
    (KE2, 320),
    (KE3, 64),
    (ServerSetup, 128),
    (ServerLoginState, 128),
]


@pytest.mark.parametrize(("cls", "size"), MESSAGE_TYPES, ids=[c.__name__ for c, _ in MESSAGE_TYPES])
def test_sizes_constant(cls: type[Any], size: int) -> None:
    assert size == cls.SIZE


@pytest.mark.parametrize(("cls", "size"), MESSAGE_TYPES, ids=[c.__name__ for c, _ in MESSAGE_TYPES])
@pytest.mark.parametrize("delta", [-1, 1, "empty"])
def test_wrong_length_raises(cls: type[Any], size: int, delta: int | str) -> None:
    length = 0 if delta == "empty" else size + int(delta)
    with pytest.raises(OpaqueError, match="must be"):
        cls.deserialize(bytes(length))


def test_opaque_error_is_value_error() -> None:
    assert issubclass(OpaqueError, ValueError)
    for sub in (EnvelopeRecoveryError, ServerAuthenticationError, ClientAuthenticationError):
        assert issubclass(sub, OpaqueError)


def test_non_bytes_rejected() -> None:
    with pytest.raises(OpaqueError):
        KE3.deserialize("00" * 64)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad_point",
    [
        bytes(32),  # identity
        b"\xff" * 32,  # non-canonical
        bytes.fromhex("01" + "00" * 31),  # not a valid encoding (odd / negative)
    ],
    ids=["identity", "non-canonical", "invalid"],
)
def test_invalid_points_rejected(bad_point: bytes) -> None:
    with pytest.raises(OpaqueError, match="ristretto255"):
        RegistrationRequest.deserialize(bad_point)
    with pytest.raises(OpaqueError, match="ristretto255"):
        CredentialRequest.deserialize(bad_point)
    with pytest.raises(OpaqueError, match="ristretto255"):
        KE1.deserialize(bad_point + bytes(32) + bad_point)
    good = ServerSetup.generate().server_public_key
    with pytest.raises(OpaqueError, match="ristretto255"):
        RegistrationResponse.deserialize(good + bad_point)
    with pytest.raises(OpaqueError, match="ristretto255"):
        RegistrationRecord.deserialize(bad_point + bytes(64 + 96))
    with pytest.raises(OpaqueError, match="ristretto255"):
        AuthResponse.deserialize(bytes(32) + bad_point + bytes(64))


def test_invalid_blind_rejected() -> None:
    with pytest.raises(OpaqueError):
        client_start_registration(PASSWORD, blind=bytes(32))
    with pytest.raises(OpaqueError):
        client_start_login(PASSWORD, blind=b"\xff" * 32)
    with pytest.raises(OpaqueError):
        client_start_login(PASSWORD, client_nonce=b"short")


def test_server_setup_serialization() -> None:
    setup = ServerSetup.generate()
    raw = setup.serialize()
    assert len(raw) == 128
    assert ServerSetup.deserialize(raw) == setup
    other = ServerSetup.generate()
    with pytest.raises(OpaqueError, match="does not match"):
        ServerSetup(setup.oprf_seed, setup.server_private_key, other.server_public_key)
    assert setup.oprf_seed.hex() not in repr(setup)
    assert setup.server_private_key.hex() not in repr(setup)


def test_messages_round_trip_serialization() -> None:
    setup = ServerSetup.generate()
    ksf = IdentityKSF()
    record, _ = _register(setup, PASSWORD, ksf)
    state, ke1 = client_start_login(PASSWORD)
    ke2, server_state = server_generate_ke2(setup, record, CRED_ID, ke1)
    ke3, _, _ = client_finish_login(state, ke2, ksf)
    for msg in (record, ke1, ke2, ke3, server_state):
        assert type(msg).deserialize(msg.serialize()) == msg


def test_default_context() -> None:
    assert opaque.DEFAULT_CONTEXT == b"qpc-opaque-v1"
