"""Verifying key-transparency client: the SDK side of ``kt_log`` and ``qpc-client kt``.

Every answer is checked against a **signed tree head** (STH), and every STH against the last
one this client accepted, which it remembers in a :class:`KtState` (JSON-serialisable; the
caller persists it between runs):

1. the STH signature verifies with the log key pinned on first use (``state.log_key``);
2. the tree never shrinks, the same size never has two roots, and a larger tree is proven
   to extend the remembered one with a consistency proof (522): a log that forks or
   rewinds (rewrites history) fails here;
3. the STH is not older than the newest one accepted before, nor (if the caller set
   ``state.max_sth_age_secs``) older than that many seconds;
4. the inclusion proof verifies against that STH's root and size;
5. a name's binding never goes back to an older leaf with another key than the newest one
   this client verified for that name (``state.names``).

    state = KtState.from_dict(saved)
    resp = await resolve_verified(client, "alice", state)   # raises KtError on a bad proof
    saved = state.to_dict()

Not detectable by a client on its own (see the plugin README): a server that omits a
revocation from CheckRevocation, or that answers with a superseded binding (with the genuine
proof of its old leaf) for a name this client has not seen a newer binding of: the Merkle log
proves inclusion, not absence or newest-ness.  :func:`audit` walks the whole log and catches
both, and any other inconsistency between entries and the signed root.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qpc_core.client.sdk import QpcClient
from qpc_core.errors import RpcError
from qpc_core.identity import verify_signature
from qpc_core.pb import directory_pb2 as pb
from qpc_core.users import normalize_username
from qpc_kt_log.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    Frontier,
    binding_leaf_hash,
    revocation_leaf_hash,
    verify_consistency,
    verify_inclusion,
)
from qpc_kt_log.records import (
    KIND_BINDING,
    KIND_REVOCATION,
    REVOCATION_REASONS,
    sth_signed_bytes,
)

__all__ = [
    "AuditError",
    "AuditReport",
    "ConsistencyError",
    "FreshnessError",
    "InclusionError",
    "KeyRevokedError",
    "KtError",
    "KtState",
    "SignatureError",
    "accept_sth",
    "add_commands",
    "audit",
    "check_revocation_verified",
    "get_consistency_proof",
    "get_sth",
    "resolve_identity_verified",
    "resolve_verified",
    "revoke_key",
    "run",
    "verify_sth_signature",
]

REVOKE_KEY, CHECK_REVOCATION, AUDIT, GET_STH, GET_CONSISTENCY = 510, 511, 520, 521, 522


class KtError(Exception):
    """Key-transparency verification failed: do not trust the answer."""


class SignatureError(KtError):
    """A signed tree head is malformed, badly signed, or signed by another key."""


class ConsistencyError(KtError):
    """The log is not an extension of the one seen before: it forked or was rewound."""


class FreshnessError(KtError):
    """A signed tree head is older than one accepted before, or than the allowed age."""


class InclusionError(KtError):
    """An inclusion proof is missing or does not verify against its signed tree head."""


class KeyRevokedError(KtError):
    """The identity key has a (verified) revocation in the log."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class AuditError(KtError):
    """Walking the log found entries that do not add up to the signed root."""


@dataclass
class KtState:
    """What a client remembers between runs: the pinned log key, the last accepted STH and,
    per username, the newest binding verified (leaf index, identity key).

    ``max_sth_age_secs`` is a policy, not persisted: when set, a head whose timestamp is more
    than that many seconds in the past (by ``clock``) is refused with :class:`FreshnessError`.
    Set it above the server's ``sth_max_age_secs`` (300 by default) plus clock skew."""

    log_key: bytes | None = None
    tree_size: int = 0
    root_hash: bytes = EMPTY_ROOT
    timestamp_ms: int = 0
    names: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    max_sth_age_secs: float | None = field(default=None, compare=False)
    clock: Callable[[], float] = field(default=time.time, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"version": 1, "log_key": self.log_key.hex() if self.log_key else None,
                "tree_size": self.tree_size, "root_hash": self.root_hash.hex(),
                "timestamp_ms": self.timestamp_ms,
                "names": {n: [leaf, key.hex()] for n, (leaf, key) in self.names.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> KtState:
        """Inverse of :meth:`to_dict`; ``{}``/``None`` is a fresh state.  ``ValueError`` when
        malformed (never silently forget a remembered head)."""
        if not data:
            return cls()
        try:
            key = bytes.fromhex(data["log_key"]) if data.get("log_key") else None
            names = {str(n): (int(v[0]), bytes.fromhex(v[1]))
                     for n, v in (data.get("names") or {}).items()}
            state = cls(key, int(data["tree_size"]), bytes.fromhex(data["root_hash"]),
                        int(data.get("timestamp_ms", 0)), names)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise ValueError(f"key-transparency state is unreadable: {e}") from None
        if (key is not None and len(key) != 32) or len(state.root_hash) != HASH_SIZE \
                or state.tree_size < 0 or state.timestamp_ms < 0 \
                or any(leaf < 0 or len(k) != 32 for leaf, k in names.values()):
            raise ValueError("key-transparency state is unreadable: bad key, root, size or "
                             "name binding")
        return state


# -- raw calls --------------------------------------------------------------------------------


async def get_sth(client: QpcClient) -> pb.SignedTreeHead:
    resp = await client.call(GET_STH, pb.GetSignedTreeHeadRequest(),
                             pb.GetSignedTreeHeadResponse)
    return resp.sth


async def get_consistency_proof(client: QpcClient, old_size: int, new_size: int) -> list[bytes]:
    resp = await client.call(GET_CONSISTENCY, pb.GetConsistencyProofRequest(
        old_size=old_size, new_size=new_size), pb.GetConsistencyProofResponse)
    return list(resp.proof)


async def revoke_key(client: QpcClient, reason: str, identity_key: bytes | None = None) -> int:
    """Revoke the client's own identity key (the server only lets the owner); leaf index."""
    key = identity_key or client.identity_key
    if key is None:
        raise ValueError("no identity key to revoke")
    resp = await client.call(REVOKE_KEY, pb.RevokeKeyRequest(identity_key=key, reason=reason),
                             pb.RevokeKeyResponse)
    return resp.leaf_index


async def audit_page(client: QpcClient, start: int, end: int = 0
                     ) -> pb.AuditKeyTransparencyResponse:
    return await client.call(AUDIT, pb.AuditKeyTransparencyRequest(start=start, end=end),
                             pb.AuditKeyTransparencyResponse)


# -- verification ---------------------------------------------------------------------------


def verify_sth_signature(sth: pb.SignedTreeHead, log_key: bytes | None = None) -> None:
    """Check the head is well formed and signed by ``log_key`` (default: its own key)."""
    key = log_key if log_key is not None else sth.public_key
    if len(sth.root_hash) != HASH_SIZE or len(sth.public_key) != 32:
        raise SignatureError("malformed signed tree head")
    if sth.public_key != key:
        raise SignatureError(
            f"the log's signing key changed: pinned {key.hex()[:16]}…, "
            f"got {sth.public_key.hex()[:16]}…")
    message = sth_signed_bytes(sth.tree_size, sth.root_hash, sth.timestamp_ms)
    if not verify_signature(key, sth.signature, message):
        raise SignatureError(f"bad signature on the tree head of size {sth.tree_size}")


async def accept_sth(client: QpcClient, sth: pb.SignedTreeHead, state: KtState) -> None:
    """Verify ``sth`` and that it extends the remembered head; then remember it.

    Refuses (:class:`FreshnessError`) a head older than the one remembered, or older than
    ``state.max_sth_age_secs`` when that is set.  The state changes only when every check
    passed."""
    verify_sth_signature(sth, state.log_key)
    size, root = sth.tree_size, bytes(sth.root_hash)
    if state.log_key is not None:
        if size < state.tree_size:
            raise ConsistencyError(
                f"the log was rewound: tree size {size} < {state.tree_size} seen before")
        if size == state.tree_size:
            if root != state.root_hash:
                raise ConsistencyError(
                    f"the log forked: two different roots for tree size {size}")
        elif state.tree_size > 0:
            try:
                proof = await get_consistency_proof(client, state.tree_size, size)
            except RpcError as e:  # e.g. the signed size is beyond the server's own tree
                raise ConsistencyError(
                    f"the server could not prove tree size {size} extends size "
                    f"{state.tree_size} seen before: {e}") from None
            if not verify_consistency(state.tree_size, size, state.root_hash, root, proof):
                raise ConsistencyError(
                    f"the log forked or rewrote history: tree size {size} is not an extension "
                    f"of the tree of size {state.tree_size} seen before")
        # after the fork checks above, which report the graver problem
        if sth.timestamp_ms < state.timestamp_ms:
            raise FreshnessError(
                f"the signed tree head of size {size} (signed at {sth.timestamp_ms} ms) is "
                f"older than the head seen before (size {state.tree_size}, signed at "
                f"{state.timestamp_ms} ms)")
    if state.max_sth_age_secs is not None:
        age = state.clock() - sth.timestamp_ms / 1000
        if age > state.max_sth_age_secs:
            raise FreshnessError(
                f"the signed tree head of size {size} is {age:.0f} s old (at most "
                f"{state.max_sth_age_secs:g} s allowed): the log may be frozen")
    state.log_key = bytes(sth.public_key)
    state.tree_size, state.root_hash, state.timestamp_ms = size, root, sth.timestamp_ms


async def verify_inclusion_proof(client: QpcClient, leaf_hash: bytes, inclusion: pb.KtInclusion,
                                 state: KtState, what: str) -> None:
    """Accept the proof's STH (see :func:`accept_sth`), then check ``leaf_hash`` is in it."""
    if not inclusion.HasField("sth"):
        raise InclusionError(f"{what}: the proof carries no signed tree head")
    sth = inclusion.sth
    if inclusion.tree_size != sth.tree_size:
        raise InclusionError(f"{what}: proof is for tree size {inclusion.tree_size}, "
                             f"the signed head for {sth.tree_size}")
    await accept_sth(client, sth, state)
    if not verify_inclusion(leaf_hash, inclusion.leaf_index, sth.tree_size,
                            list(inclusion.audit_path), sth.root_hash):
        raise InclusionError(f"{what}: inclusion proof does not verify against the signed "
                             f"tree head (leaf {inclusion.leaf_index}, size {sth.tree_size})")


def _check_not_superseded(state: KtState, username: str, identity_key: bytes,
                          leaf_index: int) -> None:
    """Refuse a binding older than the newest one this client verified for ``username``."""
    seen = state.names.get(username)
    if seen is not None and leaf_index < seen[0] and identity_key != seen[1]:
        raise InclusionError(
            f"@{username}: the server answered with the binding at leaf {leaf_index}, but this "
            f"client already verified a newer binding to another key at leaf {seen[0]}: the "
            "answer is superseded")


def _remember_binding(state: KtState, username: str, identity_key: bytes,
                      leaf_index: int) -> None:
    seen = state.names.get(username)
    if seen is None or leaf_index >= seen[0]:
        state.names[username] = (leaf_index, bytes(identity_key))


async def check_revocation_verified(client: QpcClient, identity_key: bytes,
                                    state: KtState) -> str | None:
    """The key's revocation reason (its inclusion verified), or ``None`` if the server says
    it is not revoked."""
    resp = await client.call(CHECK_REVOCATION, pb.CheckRevocationRequest(
        identity_key=identity_key), pb.CheckRevocationResponse)
    if not resp.revoked:
        return None
    if not resp.HasField("inclusion"):
        raise InclusionError("revocation: the server sent no inclusion proof")
    if resp.reason not in REVOCATION_REASONS:
        raise InclusionError(f"revocation: unknown reason {resp.reason!r}")
    await verify_inclusion_proof(client, revocation_leaf_hash(identity_key, resp.reason),
                                 resp.inclusion, state, "revocation")
    return resp.reason


async def _check_not_revoked(client: QpcClient, key: bytes, state: KtState, who: str) -> None:
    reason = await check_revocation_verified(client, key, state)
    if reason is not None:
        raise KeyRevokedError(f"{who}'s identity key {key.hex()[:16]}… is revoked ({reason})",
                              reason)


async def resolve_verified(client: QpcClient, username: str, state: KtState, *,
                           check_revocation: bool = True) -> pb.ResolveUserResponse:
    """ResolveUser (500) with the binding's inclusion proof verified (raises :class:`KtError`).

    With ``check_revocation`` the key is also looked up with CheckRevocation (511) and
    :class:`KeyRevokedError` is raised for a revoked key."""
    name = normalize_username(username)
    resp = await client.resolve_user(name)
    if resp.username != name:
        raise InclusionError(f"asked for '{name}', the server answered for '{resp.username}'")
    if not resp.HasField("inclusion"):
        raise InclusionError(f"@{name}: no key-transparency proof in the answer "
                             "(is the kt_log plugin enabled on the server?)")
    if len(resp.identity_key) != 32:
        raise InclusionError(f"@{name}: the server's identity key is not 32 bytes")
    key = bytes(resp.identity_key)
    leaf = binding_leaf_hash(name, key)
    await verify_inclusion_proof(client, leaf, resp.inclusion, state, f"@{name}")
    _check_not_superseded(state, name, key, resp.inclusion.leaf_index)
    _remember_binding(state, name, key, resp.inclusion.leaf_index)
    if check_revocation:
        await _check_not_revoked(client, key, state, f"@{name}")
    return resp


async def resolve_identity_verified(client: QpcClient, identity_key: bytes, state: KtState, *,
                                    check_revocation: bool = True
                                    ) -> pb.ResolveIdentityResponse:
    """ResolveIdentity (501) with the binding's inclusion proof verified."""
    resp = await client.resolve_identity(identity_key)
    if not resp.HasField("inclusion"):
        raise InclusionError("no key-transparency proof in the answer "
                             "(is the kt_log plugin enabled on the server?)")
    try:
        leaf = binding_leaf_hash(resp.username, identity_key)
    except ValueError:  # a NUL in the name (or not encodable): no leaf can prove it
        raise InclusionError(f"the server answered with an invalid username "
                             f"{resp.username!r}") from None
    await verify_inclusion_proof(client, leaf, resp.inclusion, state, f"@{resp.username}")
    _check_not_superseded(state, resp.username, identity_key, resp.inclusion.leaf_index)
    _remember_binding(state, resp.username, identity_key, resp.inclusion.leaf_index)
    if check_revocation:
        await _check_not_revoked(client, identity_key, state, f"@{resp.username}")
    return resp


@dataclass
class AuditReport:
    tree_size: int
    root_hash: bytes
    bindings: int = 0
    revocations: int = 0
    rotations: int = 0
    usernames: int = 0
    pages: int = 0
    problems: list[str] = field(default_factory=list)


def _entry_leaf(e: pb.KtEntry) -> bytes:
    if e.kind == KIND_BINDING:
        if len(e.identity_key) != 32:
            raise AuditError(f"entry {e.index}: identity key is not 32 bytes")
        try:
            return binding_leaf_hash(e.username, e.identity_key)
        except ValueError as err:
            raise AuditError(f"entry {e.index}: {err}") from None
    if e.kind == KIND_REVOCATION:
        return revocation_leaf_hash(e.identity_key, e.reason)
    raise AuditError(f"entry {e.index}: unknown kind {e.kind}")


async def audit(client: QpcClient, state: KtState, *, page_size: int = 0,
                progress: Callable[[int, int], None] | None = None) -> AuditReport:
    """Walk the whole log: check each entry's leaf hash and the log's rules, recompute the
    root and compare it with a signed tree head that is consistent with ``state``.

    Raises :class:`KtError` on the first hard failure (bad signature, fork, a leaf that does
    not match its entry, root mismatch); rule violations (a key revoked twice, a revocation
    of a key never bound) are collected in :attr:`AuditReport.problems`."""
    sth = await get_sth(client)
    await accept_sth(client, sth, state)
    target, log_key = sth.tree_size, bytes(sth.public_key)
    report = AuditReport(target, bytes(sth.root_hash))
    frontier = Frontier()
    names: dict[str, bytes] = {}
    bound: set[bytes] = set()
    revoked: set[bytes] = set()
    while frontier.size < target:
        start = frontier.size
        end = min(target, start + page_size) if page_size > 0 else 0
        page = await audit_page(client, start, end)
        report.pages += 1
        verify_sth_signature(page.sth, log_key)
        if page.sth.tree_size < target:
            raise ConsistencyError(f"audit: the log shrank to {page.sth.tree_size} < {target} "
                                   "during the walk")
        if not page.entries:
            raise AuditError(f"audit: the server returned no entries at index {start} "
                             f"of {target}")
        for e in page.entries:
            if frontier.size >= target:
                break
            if e.index != frontier.size:
                raise AuditError(f"audit: expected entry {frontier.size}, got {e.index}")
            leaf = _entry_leaf(e)
            if leaf != e.leaf_hash:
                raise AuditError(f"entry {e.index}: leaf hash does not match its contents")
            key = bytes(e.identity_key)
            if e.kind == KIND_BINDING:
                report.bindings += 1
                if e.username in names and names[e.username] != key:
                    report.rotations += 1
                names[e.username] = key
                bound.add(key)
            else:
                report.revocations += 1
                if e.reason not in REVOCATION_REASONS:
                    report.problems.append(f"entry {e.index}: unknown reason {e.reason!r}")
                if key not in bound:
                    report.problems.append(
                        f"entry {e.index}: revokes key {key.hex()[:16]}… that was never bound")
                if key in revoked:
                    report.problems.append(
                        f"entry {e.index}: key {key.hex()[:16]}… is revoked twice")
                revoked.add(key)
            frontier.append(leaf)
        if progress is not None:
            progress(frontier.size, target)
    report.usernames = len(names)
    if frontier.root() != report.root_hash:
        raise AuditError(f"audit: the recomputed root {frontier.root().hex()[:16]}… does not "
                         f"match the signed tree head's {report.root_hash.hex()[:16]}… "
                         f"(size {target})")
    return report


# -- qpc-client kt ... ----------------------------------------------------------------------------


def add_commands(subparsers: Any) -> None:
    """Add ``kt verify @USERNAME`` and ``kt audit`` to qpc-client's sub-command parsers."""
    kt = subparsers.add_parser("kt", help="key transparency: verify bindings, audit the log")
    sub = kt.add_subparsers(dest="kt_command", required=True, metavar="{verify,audit}")
    v = sub.add_parser("verify", help="resolve @USERNAME and verify its inclusion proof, the "
                                      "signed tree head and consistency with the last head "
                                      "seen")
    v.add_argument("username", help="@username (or username)")
    v.add_argument("--no-revocation-check", action="store_true",
                   help="do not ask CheckRevocation for the resolved key")
    a = sub.add_parser("audit", help="walk the whole log, recompute the root and check the "
                                     "signed tree head")
    a.add_argument("--page-size", type=int, default=0,
                   help="entries per request (default: the server's maximum)")
    for p in (v, a):
        p.add_argument("--max-head-age", type=float, default=None, metavar="SECONDS",
                       help="FAIL when the server's signed tree head is older than this "
                            "(default: no limit; use more than the server's sth_max_age_secs, "
                            "300 by default)")


def _emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data) if getattr(args, "json", False) else text)


async def run(args: argparse.Namespace, client: QpcClient, state_dict: dict[str, Any]) -> int:
    """Run ``qpc-client kt ...``: 0 = PASS, 1 = FAIL.  ``state_dict`` is read and updated in
    place (the caller persists it); after a FAIL it still holds the last good head, so every
    later run keeps failing against a forked log."""
    try:
        state = KtState.from_dict(state_dict)
    except ValueError as e:
        _emit(args, {"result": "FAIL", "error": str(e)}, f"FAIL  {e}")
        return 1
    state.max_sth_age_secs = getattr(args, "max_head_age", None)
    seen_before = state.tree_size
    try:
        if args.kt_command == "verify":
            resp = await resolve_verified(client, args.username, state,
                                          check_revocation=not args.no_revocation_check)
            inc = resp.inclusion
            _emit(args, {
                "result": "PASS", "username": resp.username,
                "identity_key": resp.identity_key.hex(), "leaf_index": inc.leaf_index,
                "tree_size": inc.sth.tree_size, "root_hash": inc.sth.root_hash.hex(),
                "timestamp_ms": inc.sth.timestamp_ms, "consistent_from": seen_before,
            }, f"PASS  @{resp.username} -> {resp.identity_key.hex()}\n"
               f"      leaf {inc.leaf_index} in signed tree of size {inc.sth.tree_size} "
               f"(root {inc.sth.root_hash.hex()[:16]}…), consistent with size {seen_before} "
               "seen before")
        elif args.kt_command == "audit":
            report = await audit(client, state, page_size=args.page_size)
            result = "FAIL" if report.problems else "PASS"
            _emit(args, {
                "result": result, "tree_size": report.tree_size,
                "root_hash": report.root_hash.hex(), "bindings": report.bindings,
                "revocations": report.revocations, "rotations": report.rotations,
                "usernames": report.usernames, "pages": report.pages,
                "problems": report.problems, "consistent_from": seen_before,
            }, "\n".join([
                f"{result}  audited {report.tree_size} entries in {report.pages} "
                f"page{'' if report.pages == 1 else 's'}: "
                f"root {report.root_hash.hex()[:16]}… matches the signed tree head",
                f"      {report.bindings} bindings ({report.usernames} usernames, "
                f"{report.rotations} rotations), {report.revocations} revocations; "
                f"consistent with size {seen_before} seen before",
                *(f"      problem: {p}" for p in report.problems),
            ]))
            return 1 if report.problems else 0
        else:  # pragma: no cover - argparse enforces the choices
            raise SystemExit(f"unknown kt command {args.kt_command!r}")
    except KtError as e:
        _emit(args, {"result": "FAIL", "error": str(e), "kind": type(e).__name__},
              f"FAIL  {e}")
        return 1
    finally:
        state_dict.clear()
        state_dict.update(state.to_dict())
    return 0
