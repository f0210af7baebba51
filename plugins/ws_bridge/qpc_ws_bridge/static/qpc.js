/* qpc browser client: qpc RPC frames over the server's WebSocket bridge.
 *
 * Load it with <script src="https://your.server/v1/ws/qpc.js"></script> (the bridge serves it)
 * and use globalThis.Qpc:
 *
 *   const me = await Qpc.generateIdentity();            // Ed25519 in WebCrypto
 *   const s = await Qpc.QpcSocket.connect("wss://chat.example.org/v1/ws", {token});
 *   await s.proveIdentity(me);
 *   await s.enqueue(peerKey, ciphertext);                 // -> {seq, proof, duplicate}
 *   const msgs = await s.fetchWait(30000);                // -> [{seq, data}]
 *
 * The server stores and forwards ciphertext only: encrypt before enqueue (MLS, or any scheme
 * your application uses).  Wire format: docs/protocol.md, "WebSocket bridge".
 */
(function (root) {
  "use strict";

  const SUBPROTOCOL = "qpc.v1";
  const KIND_AUTH = 0x01, KIND_REQUEST = 0x02, KIND_CANCEL = 0x03;
  const KIND_RESPONSE = 0x02, KIND_PUSH = 0x03;  // server -> client
  const PROVE_CONTEXT = "qpc-v1 prove-identity\u0000";
  const HOST_CONTEXT = "qpc-v1 ws-host\u0000";
  const METHOD = { ENQUEUE: 200, FETCH: 201, FETCH_WAIT: 202, PEEK: 203, ACK: 204,
                   AUTH_CHALLENGE: 104, PROVE_IDENTITY: 105, WHOAMI: 106, HEALTH: 802 };
  const EVENT = { NEW_MESSAGE: 1, SESSION_REVOKED: 2, SERVER_SHUTTING_DOWN: 3 };
  const STATUS = ["OK", "BAD_REQUEST", "UNAUTHENTICATED", "FORBIDDEN", "NOT_FOUND", "CONFLICT",
                  "TOO_LARGE", "RATE_LIMITED", "UNIMPLEMENTED", "UNAVAILABLE", "INTERNAL",
                  "PROTOCOL_ERROR", "QUOTA_EXCEEDED"];
  const utf8 = new TextEncoder();
  const fromUtf8 = new TextDecoder();

  // -- protobuf: the field types qpc's messages use (varint, bytes, strings) ----------------
  function pushVarint(out, value) {
    let v = BigInt(value);
    while (v >= 0x80n) { out.push(Number(v & 0x7fn) | 0x80); v >>= 7n; }
    out.push(Number(v));
  }

  /** Encode [[fieldNumber, value], ...]: Uint8Array/string -> bytes, number/bigint/bool -> varint. */
  function pbEncode(fields) {
    const parts = [];
    let size = 0;
    for (const [no, value] of fields) {
      if (value === undefined || value === null) continue;
      const head = [];
      if (value instanceof Uint8Array || typeof value === "string") {
        const bytes = typeof value === "string" ? utf8.encode(value) : value;
        if (!bytes.length) continue;  // proto3 default: not written
        pushVarint(head, (no << 3) | 2);
        pushVarint(head, bytes.length);
        parts.push(Uint8Array.from(head), bytes);
        size += head.length + bytes.length;
      } else {
        const n = typeof value === "boolean" ? (value ? 1 : 0) : value;
        if (typeof n === "number" ? !Number.isSafeInteger(n) || n < 0
            : typeof n !== "bigint" || n < 0n || n >= 1n << 64n) {
          throw new RangeError("field " + no + ": a varint must be an integer in 0..2^64-1");
        }
        if (!n) continue;
        pushVarint(head, (no << 3) | 0);
        pushVarint(head, n);
        parts.push(Uint8Array.from(head));
        size += head.length;
      }
    }
    return concat(parts, size);
  }

  /** Decode to a Map: field number -> array of values (Uint8Array or BigInt). */
  function pbDecode(buf) {
    const out = new Map();
    let pos = 0;
    const varint = () => {
      let v = 0n, shift = 0n;
      for (;;) {
        if (pos >= buf.length) throw new QpcError(0, "MALFORMED", "truncated varint");
        const b = buf[pos++];
        v |= BigInt(b & 0x7f) << shift;
        if (!(b & 0x80)) return v;
        shift += 7n;
      }
    };
    while (pos < buf.length) {
      const tag = Number(varint());
      const no = tag >> 3, type = tag & 7;
      let value;
      if (type === 0) value = varint();
      else if (type === 2) {
        const n = Number(varint());
        if (pos + n > buf.length) throw new QpcError(0, "MALFORMED", "truncated field");
        value = buf.subarray(pos, pos + n);
        pos += n;
      } else if (type === 1) { pos += 8; continue; }
      else if (type === 5) { pos += 4; continue; }
      else throw new QpcError(0, "MALFORMED", "unsupported wire type " + type);
      if (!out.has(no)) out.set(no, []);
      out.get(no).push(value);
    }
    return out;
  }

  const one = (m, no) => (m.get(no) || [])[0];
  const bytesOf = (m, no) => one(m, no) || new Uint8Array(0);
  const numberOf = (m, no) => Number(one(m, no) || 0n);

  function concat(parts, size) {
    if (size === undefined) size = parts.reduce((n, p) => n + p.length, 0);
    const out = new Uint8Array(size);
    let pos = 0;
    for (const p of parts) { out.set(p, pos); pos += p.length; }
    return out;
  }

  class QpcError extends Error {
    constructor(status, name, message, retryAfterMs) {
      super(message);
      this.status = status;
      this.code = name;
      this.retryAfterMs = retryAfterMs || 0;
    }
  }

  function decodeError(status, payload) {
    try {
      const m = pbDecode(payload);
      const name = fromUtf8.decode(bytesOf(m, 2)) || "ERROR";
      return new QpcError(status, name, fromUtf8.decode(bytesOf(m, 3)) || name, numberOf(m, 4));
    } catch (e) {
      return new QpcError(status, "ERROR", "call failed with status " + status);
    }
  }

  async function sha256(bytes) {
    return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  }

  /** A new Ed25519 identity: {privateKey (CryptoKey), publicKey (32 raw bytes)}. */
  async function generateIdentity() {
    const pair = await crypto.subtle.generateKey({ name: "Ed25519" }, true, ["sign", "verify"]);
    const raw = new Uint8Array(await crypto.subtle.exportKey("raw", pair.publicKey));
    return { privateKey: pair.privateKey, publicKey: raw };
  }

  class QpcSocket {
    constructor(ws, url) {
      this.ws = ws;
      this.url = new URL(url);
      this.pending = new Map();
      this.nextId = 1;
      this.identityKey = null;
      /** Called with (eventType, payloadBytes) for every push (e.g. EVENT.NEW_MESSAGE). */
      this.onpush = null;
      this.closed = new Promise((resolve) => { this._resolveClosed = resolve; });
      this._authWaiter = null;
      ws.binaryType = "arraybuffer";
      ws.onmessage = (ev) => this._onMessage(ev.data);
      ws.onclose = (ev) => {
        const err = new QpcError(0, "CLOSED", "connection closed (" + ev.code + " " + ev.reason + ")");
        for (const { reject } of this.pending.values()) reject(err);
        this.pending.clear();
        if (this._authWaiter) this._authWaiter.reject(err);
        this._resolveClosed({ code: ev.code, reason: ev.reason });
      };
    }

    /** Open the bridge at url (ws:// or wss://.../v1/ws); with {token}: authenticate. */
    static connect(url, options) {
      const opts = options || {};
      return new Promise((resolve, reject) => {
        let ws;
        try { ws = new WebSocket(url, SUBPROTOCOL); } catch (e) { reject(e); return; }
        ws.onerror = () => reject(new QpcError(0, "CONNECT", "cannot open " + url));
        ws.onopen = () => {
          ws.onerror = null;
          const s = new QpcSocket(ws, url);
          if (opts.token === undefined || opts.token === null) { resolve(s); return; }
          s.authenticate(opts.token).then(() => resolve(s), (e) => { s.close(); reject(e); });
        };
      });
    }

    authenticate(token) {
      const t = utf8.encode(token);
      if (t.length > 0xffff) {
        return Promise.reject(new QpcError(0, "BAD_REQUEST", "token longer than 65535 bytes"));
      }
      if (this.ws.readyState !== WebSocket.OPEN) {
        return Promise.reject(new QpcError(0, "CLOSED", "connection closed"));
      }
      const msg = new Uint8Array(3 + t.length);
      msg[0] = KIND_AUTH;
      new DataView(msg.buffer).setUint16(1, t.length);
      msg.set(t, 3);
      return new Promise((resolve, reject) => {
        this._authWaiter = {
          resolve: (status) => status === 0 ? resolve() :
            reject(new QpcError(status, STATUS[status] || "ERROR",
                                status === 7 ? "too many refused tokens from this address; retry later"
                                             : "auth message refused")),
          reject,
        };
        this.ws.send(msg);
      });
    }

    _onMessage(data) {
      const buf = new Uint8Array(data);
      if (!buf.length) return;
      const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
      if (buf[0] === KIND_AUTH && buf.length === 2) {
        const w = this._authWaiter;
        this._authWaiter = null;
        if (w) w.resolve(buf[1]);
      } else if (buf[0] === KIND_RESPONSE && buf.length >= 10) {
        const status = buf[1], rid = view.getUint32(2), len = view.getUint32(6);
        const payload = buf.subarray(10, 10 + len);
        const p = this.pending.get(rid);
        if (!p) {
          // A protocol error about the auth message (request id 0) while it waits.
          if (rid === 0 && status !== 0 && this._authWaiter) {
            const w = this._authWaiter;
            this._authWaiter = null;
            w.reject(decodeError(status, payload));
          }
          return;
        }
        this.pending.delete(rid);
        if (status === 0) p.resolve(payload); else p.reject(decodeError(status, payload));
      } else if (buf[0] === KIND_PUSH && buf.length >= 7) {
        const event = view.getUint16(1), len = view.getUint32(3);
        if (this.onpush) this.onpush(event, buf.subarray(7, 7 + len));
      }
    }

    /** Call methodId with a protobuf payload; resolves to the response payload. */
    call(methodId, payload, options) {
      const body = payload || new Uint8Array(0);
      const signal = options && options.signal;
      const rid = this.nextId;
      this.nextId = (this.nextId % 0xffffffff) + 1;
      const msg = new Uint8Array(11 + body.length);
      const view = new DataView(msg.buffer);
      msg[0] = KIND_REQUEST;
      view.setUint16(1, methodId);
      view.setUint32(3, rid);
      view.setUint32(7, body.length);
      msg.set(body, 11);
      return new Promise((resolve, reject) => {
        if (signal && signal.aborted) { reject(signal.reason); return; }
        if (this.ws.readyState !== WebSocket.OPEN) {
          reject(new QpcError(0, "CLOSED", "connection closed"));
          return;
        }
        let onAbort = null;
        const settle = (fn) => (value) => {
          if (onAbort) signal.removeEventListener("abort", onAbort);
          fn(value);
        };
        this.pending.set(rid, { resolve: settle(resolve), reject: settle(reject) });
        if (signal) {
          onAbort = () => {
            if (!this.pending.delete(rid)) return;
            const cancel = new Uint8Array(5);
            cancel[0] = KIND_CANCEL;
            new DataView(cancel.buffer).setUint32(1, rid);
            if (this.ws.readyState === WebSocket.OPEN) this.ws.send(cancel);
            signal.removeEventListener("abort", onAbort);
            reject(signal.reason);
          };
          signal.addEventListener("abort", onAbort);
        }
        this.ws.send(msg);
      });
    }

    async callPb(methodId, fields, options) {
      return pbDecode(await this.call(methodId, pbEncode(fields), options));
    }

    async health() {
      const m = await this.callPb(METHOD.HEALTH, []);
      return { status: fromUtf8.decode(bytesOf(m, 1)), version: fromUtf8.decode(bytesOf(m, 2)),
               signingKey: bytesOf(m, 4) };
    }

    async whoami() {
      const m = await this.callPb(METHOD.WHOAMI, []);
      return { authenticated: numberOf(m, 1) === 1, authKind: fromUtf8.decode(bytesOf(m, 2)),
               identityKey: bytesOf(m, 3), username: fromUtf8.decode(bytesOf(m, 4)) };
    }

    /** Prove the identity {privateKey, publicKey} (see generateIdentity) on this connection.
     * The signature covers the challenge, the key and the host this page connected to, so a
     * proof cannot be replayed through another server. */
    async proveIdentity(identity) {
      const ch = await this.callPb(METHOD.AUTH_CHALLENGE, []);
      const binding = await sha256(utf8.encode(HOST_CONTEXT + this.url.host));
      const message = concat([utf8.encode(PROVE_CONTEXT), bytesOf(ch, 1), identity.publicKey,
                              binding]);
      const sig = new Uint8Array(await crypto.subtle.sign({ name: "Ed25519" },
                                                          identity.privateKey, message));
      await this.callPb(METHOD.PROVE_IDENTITY, [[1, identity.publicKey], [2, sig]]);
      this.identityKey = identity.publicKey;
    }

    /** Enqueue ciphertext for recipient (32-byte identity key). */
    async enqueue(recipient, data, options) {
      const o = options || {};
      const m = await this.callPb(METHOD.ENQUEUE, [[1, recipient], [2, data], [3, o.channelId],
                                                   [4, o.ttlSecs], [5, o.messageId]]);
      return { seq: one(m, 1) || 0n, proof: bytesOf(m, 2), duplicate: numberOf(m, 3) === 1 };
    }

    _envelopes(m) {
      return (m.get(1) || []).map((raw) => {
        const e = pbDecode(raw);
        return { seq: one(e, 1) || 0n, data: bytesOf(e, 2) };
      });
    }

    /** Take (and remove) queued messages: [{seq, data}]. */
    async fetch(limit, options) {
      const o = options || {};
      return this._envelopes(await this.callPb(METHOD.FETCH, [[1, this.identityKey],
                                                              [2, o.channelId], [3, limit || 0]]));
    }

    /** Like fetch, waiting up to timeoutMs for a message when the queue is empty. */
    async fetchWait(timeoutMs, options) {
      const o = options || {};
      return this._envelopes(await this.callPb(METHOD.FETCH_WAIT, [
        [1, this.identityKey], [2, o.channelId], [5, timeoutMs]], { signal: o.signal }));
    }

    close(code, reason) { this.ws.close(code || 1000, reason || ""); }
  }

  root.Qpc = { QpcSocket, QpcError, generateIdentity, pbEncode, pbDecode, METHOD, EVENT,
               SUBPROTOCOL };
})(typeof globalThis !== "undefined" ? globalThis : this);
