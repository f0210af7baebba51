"""Framing is sans-I/O: these tests use no event loop and no sockets."""

from __future__ import annotations

import ast
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qpc_core.framing import (
    MAX_PAYLOAD,
    AuthHandshakeDecoder,
    FrameError,
    PushDecoder,
    PushFrame,
    RequestDecoder,
    RequestFrame,
    ResponseDecoder,
    ResponseFrame,
    encode_auth_request,
    encode_push,
    encode_request,
    encode_response,
)


def test_framing_never_imports_asyncio() -> None:
    pkg = Path(__file__).resolve().parent.parent / "qpc_core" / "framing"
    for f in pkg.glob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] in {"asyncio", "aioquic"} for n in names), f


def test_header_layouts_are_big_endian() -> None:
    req = encode_request(0x0102, 0x03040506, b"xy")
    assert req == bytes([1, 2, 3, 4, 5, 6, 0, 0, 0, 2]) + b"xy"
    resp = encode_response(7, 0x01020304, b"z")
    assert resp == bytes([7, 1, 2, 3, 4, 0, 0, 0, 1]) + b"z"
    push = encode_push(0x0A0B, b"")
    assert push == bytes([0x0A, 0x0B, 0, 0, 0, 0])


@pytest.mark.parametrize(
    ("encoded", "decoder_cls", "expected"),
    [
        (
            encode_request(200, 42, b"hello world"),
            RequestDecoder,
            RequestFrame(200, 42, b"hello world"),
        ),
        (encode_response(0, 42, b"ok!"), ResponseDecoder, ResponseFrame(0, 42, b"ok!")),
        (encode_push(1, b"evt"), PushDecoder, PushFrame(1, b"evt")),
        (encode_request(802, 1, b""), RequestDecoder, RequestFrame(802, 1, b"")),
    ],
)
def test_split_at_every_byte_boundary(encoded, decoder_cls, expected) -> None:
    # Two pieces at every cut, and one byte at a time.
    for cut in range(len(encoded) + 1):
        dec = decoder_cls()
        first = dec.feed(encoded[:cut])
        if cut < len(encoded):
            assert first is None
        assert dec.feed(encoded[cut:]) == expected
        assert dec.finish() == expected
    dec = decoder_cls()
    results = [dec.feed(encoded[i : i + 1]) for i in range(len(encoded))]
    assert results[-1] == expected
    assert all(r is None for r in results[:-1])


@given(
    payload=st.binary(max_size=300),
    cuts=st.lists(st.integers(0, 320), max_size=6),
    method=st.integers(0, 0xFFFF),
    rid=st.integers(0, 0xFFFFFFFF),
)
def test_any_split_roundtrips(payload: bytes, cuts: list[int], method: int, rid: int) -> None:
    data = encode_request(method, rid, payload)
    points = sorted({min(c, len(data)) for c in cuts})
    dec = RequestDecoder()
    prev = 0
    out = None
    for p in [*points, len(data)]:
        out = dec.feed(data[prev:p]) or out
        prev = p
    assert out == RequestFrame(method, rid, payload)


def test_oversize_is_rejected_from_the_header_alone() -> None:
    header = struct.pack(">HII", 200, 1, MAX_PAYLOAD + 1)
    dec = RequestDecoder()
    with pytest.raises(FrameError) as ei:
        dec.feed(header)  # no body bytes needed to decide
    assert ei.value.reason == "oversize"
    assert dec.buffered <= len(header)


def test_configured_lower_limit() -> None:
    dec = RequestDecoder(max_payload=1024)
    with pytest.raises(FrameError, match="exceeds the limit of 1024"):
        dec.feed(struct.pack(">HII", 200, 1, 1025))
    assert RequestDecoder(max_payload=1024).feed(encode_request(200, 1, b"a" * 1024)) is not None
    with pytest.raises(FrameError):
        encode_request(200, 1, b"a" * 1025, max_payload=1024)


def test_limit_can_never_exceed_protocol_maximum() -> None:
    assert RequestDecoder(max_payload=10 * MAX_PAYLOAD).max_payload == MAX_PAYLOAD


def test_maximum_payload_is_accepted() -> None:
    frame = encode_request(600, 9, b"\0" * MAX_PAYLOAD)
    assert RequestDecoder().feed(frame) == RequestFrame(600, 9, b"\0" * MAX_PAYLOAD)


def test_garbage_header_with_huge_length() -> None:
    with pytest.raises(FrameError) as ei:
        RequestDecoder().feed(b"\xff" * 64)
    assert ei.value.reason == "oversize"


@pytest.mark.parametrize("n", [0, 1, 5, 9, 10, 12])
def test_truncated_stream(n: int) -> None:
    data = encode_request(200, 1, b"abc")[:n]
    dec = RequestDecoder()
    dec.feed(data)
    with pytest.raises(FrameError) as ei:
        dec.finish()
    assert ei.value.reason == "truncated"


def test_extra_bytes_after_frame() -> None:
    data = encode_request(200, 1, b"abc")
    with pytest.raises(FrameError) as ei:
        RequestDecoder().feed(data + b"!")
    assert ei.value.reason == "trailing"
    dec = RequestDecoder()
    assert dec.feed(data) is not None
    with pytest.raises(FrameError):
        dec.feed(b"more")


def test_auth_handshake_roundtrip_and_errors() -> None:
    data = encode_auth_request(b"devtoken")
    assert data == b"\x01\x00\x08devtoken"
    for cut in range(len(data) + 1):
        dec = AuthHandshakeDecoder()
        dec.feed(data[:cut])
        assert dec.feed(data[cut:]) == b"devtoken"
        assert dec.finish() == b"devtoken"
    with pytest.raises(FrameError, match="0x01"):
        AuthHandshakeDecoder().feed(b"\x02\x00\x01x")
    with pytest.raises(FrameError):
        AuthHandshakeDecoder().feed(data + b"x")
    dec = AuthHandshakeDecoder()
    dec.feed(data[:4])
    with pytest.raises(FrameError):
        dec.finish()
    with pytest.raises(FrameError):
        encode_auth_request(b"x" * 70000)


@given(st.binary(max_size=64))
def test_decoders_raise_only_frame_errors(garbage: bytes) -> None:
    for cls in (RequestDecoder, ResponseDecoder, PushDecoder):
        dec = cls()
        try:
            dec.feed(garbage)
            dec.finish()
        except FrameError:
            pass
    try:
        AuthHandshakeDecoder().feed(garbage)
    except FrameError:
        pass
