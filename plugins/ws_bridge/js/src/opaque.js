/* qpc browser OPAQUE client: registration and login with a password that never leaves the
 * browser (RFC 9807 OPAQUE-3DH, ristretto255-SHA512: the configuration of the server's
 * auth_opaque plugin), then qpc's identity-key signature over the exchange.
 *
 * Built by `npm run build` (esbuild) into qpc_ws_bridge/static/qpc-opaque.js, served next to
 * qpc.js at /v1/ws/qpc-opaque.js.  Load qpc.js first, then this file: it adds
 *
 *   await s.register(username, password, identity)  // s: a Qpc.QpcSocket
 *   const {sessionToken, expiresAt, exportKey} = await s.login(username, password, identity)
 *
 * (a login binds the connection to the session and identity, as on the QUIC port) and
 * exposes the protocol steps as globalThis.QpcOpaque.  Group arithmetic, hashing to the
 * group, SHA-512/HMAC/HKDF and Argon2id come from the audited @noble libraries; the OPAQUE
 * and OPRF steps here follow the RFCs and the server's Python implementation byte for byte
 * (checked against the RFC 9807 test vectors and against the server in a real browser).
 */
import { ristretto255, ristretto255_hasher } from "@noble/curves/ed25519.js";
import { argon2idAsync } from "@noble/hashes/argon2.js";
import { expand, extract } from "@noble/hashes/hkdf.js";
import { hmac } from "@noble/hashes/hmac.js";
import { sha256, sha512 } from "@noble/hashes/sha2.js";

const Point = ristretto255.Point;
const Fn = Point.Fn;
const utf8 = new TextEncoder();

export const NN = 32, NSEED = 32, NPK = 32, NH = 64, NM = 64, NX = 64;
const ENVELOPE_LEN = NN + NM;
const MASKED_RESPONSE_LEN = NPK + NN + NM;
const KE1_LEN = 32 + NN + 32;
const KE2_LEN = 32 + NN + MASKED_RESPONSE_LEN + NN + 32 + NM;
/** The server's default `[auth_opaque] context`. */
export const DEFAULT_CONTEXT = "qpc-opaque-v1";

const OPRF_CONTEXT = concat([utf8.encode("OPRFV1-"), Uint8Array.of(0),
                             utf8.encode("-ristretto255-SHA512")]);
const DST_HASH_TO_GROUP = concat([utf8.encode("HashToGroup-"), OPRF_CONTEXT]);
const DST_DERIVE_KEY_PAIR = concat([utf8.encode("DeriveKeyPair"), OPRF_CONTEXT]);
const INFO_DH_KEY = utf8.encode("OPAQUE-DeriveDiffieHellmanKeyPair");
const REGISTER_CONTEXT = utf8.encode("qpc-v1 register\u0000");
const LOGIN_CONTEXT = utf8.encode("qpc-v1 login\u0000");

export class OpaqueError extends Error {}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let pos = 0;
  for (const p of parts) { out.set(p, pos); pos += p.length; }
  return out;
}

function i2osp(value, length) {
  if (value < 0 || value >= 2 ** (8 * length)) throw new OpaqueError("value does not fit");
  const out = new Uint8Array(length);
  for (let i = length - 1, v = value; i >= 0; i--, v = Math.floor(v / 256)) out[i] = v % 256;
  return out;
}

const lenPrefixed = (b) => concat([i2osp(b.length, 2), b]);

/** A string (UTF-8) or bytes; anything else (a number, an <input> element, undefined) is a
 * TypeError: never read as an empty string. */
function bytes(x, what) {
  if (typeof x === "string") return utf8.encode(x);
  if (x instanceof Uint8Array) return Uint8Array.from(x);
  throw new TypeError((what || "value") + " must be a string or a Uint8Array, not " +
                      (x === null ? "null" : typeof x));
}

function xor(a, b) {
  if (a.length !== b.length) throw new OpaqueError("xor operands differ in length");
  return a.map((x, i) => x ^ b[i]);
}

/** Constant-time comparison of equal-length byte strings. */
function equal(a, b) {
  if (a.length !== b.length) return false;
  let d = 0;
  for (let i = 0; i < a.length; i++) d |= a[i] ^ b[i];
  return d === 0;
}

function random(n) {
  return crypto.getRandomValues(new Uint8Array(n));
}

function need(name, value, length) {
  if (!(value instanceof Uint8Array) || value.length !== length) {
    throw new OpaqueError(name + " must be " + length + " bytes");
  }
  return value;
}

// -- primitives (RFC 9807 section 6.4: HKDF-SHA512, HMAC-SHA512, SHA-512) ---------------------
const hash = (m) => sha512(m);
const mac = (key, m) => hmac(sha512, key, m);
const hkdfExtract = (salt, ikm) => extract(sha512, ikm, salt);
const hkdfExpand = (prk, info, length) => expand(sha512, prk, info, length);

function expandLabel(secret, label, context, length) {
  const full = concat([utf8.encode("OPAQUE-"), utf8.encode(label)]);
  return hkdfExpand(secret, concat([i2osp(length, 2), i2osp(full.length, 1), full,
                                    i2osp(context.length, 1), context]), length);
}
const deriveSecret = (secret, label, transcriptHash) =>
  expandLabel(secret, label, transcriptHash, NX);

// -- the group and the OPRF (RFC 9496, RFC 9497 mode 0x00) ------------------------------------
function scalarFromBytes(b) {
  const s = Fn.fromBytes(need("scalar", b, 32));  // canonical little-endian, < group order
  if (Fn.is0(s)) throw new OpaqueError("scalar is zero");
  return s;
}

function element(name, b) {
  need(name, b, NPK);
  let p;
  try { p = Point.fromBytes(b); } catch (e) { throw new OpaqueError(name + " is not a valid ristretto255 element"); }
  if (p.is0()) throw new OpaqueError(name + " is the identity element");
  return p;
}

function hashToScalar(msg, dst) {
  return ristretto255_hasher.hashToScalar(msg, { DST: dst });
}

/** RFC 9497 DeriveKeyPair(seed, info) -> [sk (scalar), pk (32 bytes)]. */
function deriveKeyPair(seed, info) {
  const input = concat([seed, lenPrefixed(info)]);
  for (let counter = 0; counter < 256; counter++) {
    const sk = hashToScalar(concat([input, i2osp(counter, 1)]), DST_DERIVE_KEY_PAIR);
    if (!Fn.is0(sk)) return [sk, Point.BASE.multiply(sk).toBytes()];
  }
  throw new OpaqueError("DeriveKeyPair failed");
}

export function deriveDiffieHellmanKeyPair(seed) {
  return deriveKeyPair(need("seed", seed, NSEED), INFO_DH_KEY);
}

function randomScalar() {
  for (;;) {  // 64 random bytes reduced modulo the group order: uniform to 2^-128
    let v = 0n;
    for (const b of random(64)) v = (v << 8n) | BigInt(b);
    const s = Fn.create(v);
    if (!Fn.is0(s)) return s;
  }
}

function blind(password, blindBytes) {
  const r = blindBytes ? scalarFromBytes(blindBytes) : randomScalar();
  const input = ristretto255_hasher.hashToCurve(password, { DST: DST_HASH_TO_GROUP });
  if (input.is0()) throw new OpaqueError("password maps to the identity element");
  return [r, input.multiply(r).toBytes()];
}

function finalize(password, r, evaluatedBytes) {
  const unblinded = element("evaluated_message", evaluatedBytes).multiply(Fn.inv(r)).toBytes();
  return hash(concat([lenPrefixed(password), lenPrefixed(unblinded), utf8.encode("Finalize")]));
}

// -- key stretching ---------------------------------------------------------------------------
/** The key-stretching function of the server's `[auth_opaque]` table: `ksf` "argon2id"
 * (default; `argon2_memory_kib` 19456, `argon2_iterations` 2, `argon2_parallelism` 1, a
 * zero 16-byte salt) or "identity" (test servers only).  Both sides must use the same. */
export function ksfFor(table) {
  const t = table || {};
  const ksf = t.ksf === undefined ? "argon2id" : t.ksf;
  if (ksf === "identity") return async (x) => x;
  if (ksf !== "argon2id") throw new TypeError("ksf must be \"argon2id\" or \"identity\"");
  const int = (key, dflt, min) => {
    const v = t[key] === undefined ? dflt : t[key];
    if (!Number.isSafeInteger(v) || v < min) throw new TypeError(key + " must be an integer >= " + min);
    return v;
  };
  const p = int("argon2_parallelism", 1, 1);
  const m = int("argon2_memory_kib", 19456, 8 * p), it = int("argon2_iterations", 2, 1);
  return (x) => argon2idAsync(x, new Uint8Array(16), { m, t: it, p, dkLen: NH });
}

const TABLE_KEYS = new Set(["ksf", "argon2_memory_kib", "argon2_iterations",
                            "argon2_parallelism", "context", "server_identity"]);

/** The options of register/login: the keys of the server's `[auth_opaque]` table that the
 * client must share, checked before anything is sent. */
function clientOptions(opts) {
  const o = opts === undefined ? {} : opts;
  if (o === null || typeof o !== "object") throw new TypeError("options must be an object");
  for (const k of Object.keys(o)) {
    if (!TABLE_KEYS.has(k)) {
      throw new TypeError("unknown option " + JSON.stringify(k) + " (the keys are those of " +
                          "the server's [auth_opaque] table: " + [...TABLE_KEYS].join(", ") + ")");
    }
  }
  return {
    ksf: ksfFor(o),
    context: bytes(o.context === undefined ? DEFAULT_CONTEXT : o.context, "context"),
    serverIdentity: o.server_identity === undefined || o.server_identity === ""
      ? undefined : bytes(o.server_identity, "server_identity"),
  };
}

function password(pw) {
  const b = bytes(pw, "password");
  if (!b.length) throw new TypeError("password must not be empty");
  return b;
}

async function randomizedPassword(oprfOutput, ksf) {
  return hkdfExtract(new Uint8Array(0), concat([oprfOutput, await ksf(oprfOutput)]));
}

function envelopeKeys(rp, nonce) {
  const authKey = hkdfExpand(rp, concat([nonce, utf8.encode("AuthKey")]), NH);
  const exportKey = hkdfExpand(rp, concat([nonce, utf8.encode("ExportKey")]), NH);
  const seed = hkdfExpand(rp, concat([nonce, utf8.encode("PrivateKey")]), NSEED);
  const [clientSecret, clientPublicKey] = deriveDiffieHellmanKeyPair(seed);
  return { authKey, exportKey, clientSecret, clientPublicKey };
}

function cleartextCredentials(serverPublicKey, clientPublicKey, serverIdentity, clientIdentity) {
  const sid = serverIdentity ? bytes(serverIdentity, "server identity") : serverPublicKey;
  const cid = clientIdentity ? bytes(clientIdentity, "client identity") : clientPublicKey;
  return [concat([serverPublicKey, lenPrefixed(sid), lenPrefixed(cid)]), sid, cid];
}

// -- registration (RFC 9807 section 5) ----------------------------------------------------------
/** -> {state, request (32 bytes)}.  `opts.blind` is for test vectors only. */
export function startRegistration(password, opts) {
  const pw = bytes(password, "password");
  const [r, blinded] = blind(pw, opts && opts.blind);
  return { state: { password: pw, blind: r }, request: blinded };
}

/** The server's RegistrationResponse -> {record (192 bytes, to upload), exportKey}. */
export async function finalizeRegistration(state, response, opts) {
  const o = opts || {};
  need("registration response", response, 64);
  const serverPublicKey = response.subarray(32, 64);
  element("server_public_key", serverPublicKey);
  const oprfOutput = finalize(state.password, state.blind, response.subarray(0, 32));
  const rp = await randomizedPassword(oprfOutput, o.ksf || ksfFor({ ksf: o.ksfSpec }));
  const nonce = o.envelopeNonce ? need("envelope nonce", o.envelopeNonce, NN) : random(NN);
  const maskingKey = hkdfExpand(rp, utf8.encode("MaskingKey"), NH);
  const keys = envelopeKeys(rp, nonce);
  const [cleartext] = cleartextCredentials(serverPublicKey, keys.clientPublicKey,
                                           o.serverIdentity, o.clientIdentity);
  const authTag = mac(keys.authKey, concat([nonce, cleartext]));
  return { record: concat([keys.clientPublicKey, maskingKey, nonce, authTag]),
           exportKey: keys.exportKey, serverPublicKey: Uint8Array.from(serverPublicKey) };
}

// -- login (RFC 9807 section 6) -----------------------------------------------------------------
/** -> {state, ke1 (96 bytes)}.  The options are for test vectors only. */
export function startLogin(password, opts) {
  const o = opts || {};
  const pw = bytes(password, "password");
  const [r, blinded] = blind(pw, o.blind);
  const nonce = o.clientNonce ? need("client nonce", o.clientNonce, NN) : random(NN);
  const seed = o.clientKeyshareSeed ? need("keyshare seed", o.clientKeyshareSeed, NSEED)
    : random(NSEED);
  const [clientSecret, clientKeyshare] = deriveDiffieHellmanKeyPair(seed);
  const ke1 = concat([blinded, nonce, clientKeyshare]);
  return { state: { password: pw, blind: r, clientSecret, ke1 }, ke1 };
}

/** KE2 (320 bytes) -> {ke3 (64 bytes), sessionKey, exportKey}.  A wrong password (or an
 * unknown user) throws OpaqueError("envelope recovery failed"); a server that does not hold
 * the record throws OpaqueError("server authentication failed"). */
export async function finishLogin(state, ke2, opts) {
  const o = opts || {};
  need("KE2", ke2, KE2_LEN);
  const evaluated = ke2.subarray(0, 32);
  const maskingNonce = ke2.subarray(32, 64);
  const maskedResponse = ke2.subarray(64, 64 + MASKED_RESPONSE_LEN);
  const credentialResponse = ke2.subarray(0, 64 + MASKED_RESPONSE_LEN);
  let pos = 64 + MASKED_RESPONSE_LEN;
  const serverNonce = ke2.subarray(pos, pos + NN); pos += NN;
  const serverKeyshare = ke2.subarray(pos, pos + 32); pos += 32;
  const serverMac = ke2.subarray(pos, pos + NM);

  const oprfOutput = finalize(state.password, state.blind, evaluated);
  const rp = await randomizedPassword(oprfOutput, o.ksf || ksfFor({ ksf: o.ksfSpec }));
  const maskingKey = hkdfExpand(rp, utf8.encode("MaskingKey"), NH);
  const pad = hkdfExpand(maskingKey, concat([maskingNonce, utf8.encode("CredentialResponsePad")]),
                         MASKED_RESPONSE_LEN);
  const unmasked = xor(pad, maskedResponse);
  const serverPublicKey = unmasked.subarray(0, NPK);
  const nonce = unmasked.subarray(NPK, NPK + NN);
  const authTag = unmasked.subarray(NPK + NN, NPK + ENVELOPE_LEN);
  let serverPoint;
  try { serverPoint = element("server_public_key", serverPublicKey); } catch (e) {
    throw new OpaqueError("envelope recovery failed");
  }
  const keys = envelopeKeys(rp, nonce);
  const [cleartext, sid, cid] = cleartextCredentials(serverPublicKey, keys.clientPublicKey,
                                                     o.serverIdentity, o.clientIdentity);
  if (!equal(mac(keys.authKey, concat([nonce, cleartext])), authTag)) {
    throw new OpaqueError("envelope recovery failed");
  }
  const keysharePoint = element("server_keyshare", serverKeyshare);
  const context = bytes(o.context === undefined ? DEFAULT_CONTEXT : o.context, "context");
  const preamble = concat([utf8.encode("OPAQUEv1-"), lenPrefixed(context), lenPrefixed(cid),
                           state.ke1, lenPrefixed(sid), credentialResponse, serverNonce,
                           serverKeyshare]);
  const ikm = concat([keysharePoint.multiply(state.clientSecret).toBytes(),
                      serverPoint.multiply(state.clientSecret).toBytes(),
                      keysharePoint.multiply(keys.clientSecret).toBytes()]);
  const prk = hkdfExtract(new Uint8Array(0), ikm);
  const preambleHash = hash(preamble);
  const handshakeSecret = deriveSecret(prk, "HandshakeSecret", preambleHash);
  const sessionKey = deriveSecret(prk, "SessionKey", preambleHash);
  const km2 = deriveSecret(handshakeSecret, "ServerMAC", new Uint8Array(0));
  const km3 = deriveSecret(handshakeSecret, "ClientMAC", new Uint8Array(0));
  if (!equal(mac(km2, preambleHash), serverMac)) {
    throw new OpaqueError("server authentication failed");
  }
  const ke3 = mac(km3, hash(concat([preamble, serverMac])));
  return { ke3, sessionKey, exportKey: keys.exportKey, handshakeSecret };
}

// -- qpc's methods 100-103, 107 over a Qpc.QpcSocket ---------------------------------------------
const METHOD = { REGISTER_START: 100, REGISTER_FINISH: 101, LOGIN_START: 102, LOGIN_FINISH: 103,
                 LOGOUT: 107 };

// What Python's str.strip() removes (str.isspace()), which the server applies to names.
const PY_SPACE = "\t\n\u000b\f\r\u001c\u001d\u001e\u001f \u0085\u00a0\u1680" +
  "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" +
  "\u2028\u2029\u202f\u205f\u3000";
const USERNAME_RE = /^[a-z0-9][a-z0-9._-]{1,31}$/;
const MAX_USERNAME_INPUT = 128;

/** The server's reading of a username (qpc_core.users.normalize_username: NFKC, stripped,
 * lower case, without a leading "@", then 2-32 characters of a-z 0-9 . _ -); throws a
 * Qpc.QpcError BAD_REQUEST for a name the server would refuse. */
export function normalizeUsername(name) {
  const bad = (m) => new (qpcApi().QpcError)(1, "BAD_REQUEST", m);
  if (typeof name !== "string") throw new TypeError("username must be a string");
  if (name.length > MAX_USERNAME_INPUT) throw bad("username must be 2-32 characters");
  let n = name.normalize("NFKC");
  let a = 0, b = n.length;
  while (a < b && PY_SPACE.includes(n[a])) a++;
  while (b > a && PY_SPACE.includes(n[b - 1])) b--;
  n = n.slice(a, b).toLowerCase().replace(/^@+/, "");
  if (!USERNAME_RE.test(n)) {
    throw bad("username must be 2-32 characters of a-z, 0-9, '.', '_', '-' and start with " +
              "a letter or digit");
  }
  return n;
}

async function sign(identity, message) {
  return new Uint8Array(await crypto.subtle.sign({ name: "Ed25519" }, identity.privateKey,
                                                 message));
}

function qpcApi() {
  const Qpc = globalThis.Qpc;
  if (!Qpc || !Qpc.pbDecode) throw new OpaqueError("load qpc.js before qpc-opaque.js");
  return Qpc;
}

/** Register `username` with password `pw` (a non-empty string), bound to `identity`
 * ({privateKey, publicKey}, see Qpc.generateIdentity).  `opts`: the server's [auth_opaque]
 * keys the client shares, when they differ from the defaults (`ksf`, `argon2_memory_kib`,
 * `argon2_iterations`, `argon2_parallelism`, `context`, `server_identity`).  -> exportKey. */
export async function register(socket, username, pw, identity, opts) {
  const Qpc = qpcApi();
  const o = clientOptions(opts);  // everything checked before anything is sent
  const name = normalizeUsername(username);
  const { state, request } = startRegistration(password(pw));
  const m = await socket.callPb(METHOD.REGISTER_START, [[1, name], [2, request]]);
  const response = (m.get(1) || [new Uint8Array(0)])[0];
  let fin;
  try {
    fin = await finalizeRegistration(state, response, { ksf: o.ksf,
                                                        serverIdentity: o.serverIdentity });
  } catch (e) {
    if (!(e instanceof OpaqueError)) throw e;
    throw new Qpc.QpcError(1, "BAD_REQUEST",
                           "server sent an invalid registration response: " + e.message);
  }
  const sig = await sign(identity, concat([REGISTER_CONTEXT, fin.serverPublicKey,
                                           utf8.encode(name), Uint8Array.of(0), fin.record]));
  await socket.callPb(METHOD.REGISTER_FINISH, [[1, name], [2, fin.record],
                                               [3, identity.publicKey], [4, sig]]);
  return fin.exportKey;
}

/** Log in; on success the connection is bound to the session and to `identity`.
 * -> {sessionToken (string), expiresAt (unix seconds), exportKey}.  A wrong password is a
 * Qpc.QpcError with code "UNAUTHENTICATED" (the server counts the failed attempt). */
export async function login(socket, username, pw, identity, opts) {
  const Qpc = qpcApi();
  const o = clientOptions(opts);  // everything checked before anything is sent
  const name = normalizeUsername(username);
  const { state, ke1 } = startLogin(password(pw));
  const m = await socket.callPb(METHOD.LOGIN_START, [[1, name], [2, ke1]]);
  const ke2 = (m.get(1) || [new Uint8Array(0)])[0];
  let fin;
  try {
    fin = await finishLogin(state, ke2, { ksf: o.ksf, context: o.context,
                                          serverIdentity: o.serverIdentity });
  } catch (e) {
    if (!(e instanceof OpaqueError)) throw e;
    // Finish the exchange with a KE3 that cannot verify, so the server counts the failure;
    // signing this attempt's KE1/KE2 tells it which attempt gives up.
    const sig = await sign(identity, concat([LOGIN_CONTEXT, sha256(concat([ke1, ke2])),
                                             identity.publicKey]));
    await socket.callPb(METHOD.LOGIN_FINISH, [[1, name], [2, new Uint8Array(64)],
                                              [3, identity.publicKey], [4, sig]])
      .catch(() => {});
    throw new Qpc.QpcError(2, "UNAUTHENTICATED", "login failed: wrong username or password");
  }
  const sig = await sign(identity, concat([LOGIN_CONTEXT, sha256(concat([ke1, ke2])),
                                           identity.publicKey]));
  const r = await socket.callPb(METHOD.LOGIN_FINISH, [[1, name], [2, fin.ke3],
                                                      [3, identity.publicKey], [4, sig]]);
  socket.identityKey = identity.publicKey;
  return { sessionToken: new TextDecoder().decode((r.get(1) || [new Uint8Array(0)])[0]),
           expiresAt: Number((r.get(2) || [0n])[0]), exportKey: fin.exportKey };
}

/** End this connection's session (method 107). */
export async function logout(socket) {
  await socket.callPb(METHOD.LOGOUT, []);
}

// Methods on Qpc.QpcSocket when qpc.js is loaded (it is served next to this file).
if (globalThis.Qpc && globalThis.Qpc.QpcSocket) {
  const proto = globalThis.Qpc.QpcSocket.prototype;
  proto.register = function (username, password, identity, opts) {
    return register(this, username, password, identity, opts);
  };
  proto.login = function (username, password, identity, opts) {
    return login(this, username, password, identity, opts);
  };
  proto.logout = function () { return logout(this); };
}

export { KE1_LEN, KE2_LEN };
