"""Numbered schema migrations (the applied version is recorded in ``schema_version``).

Hot paths are PL/pgSQL functions so that one Enqueue, Fetch or Peek is one round trip:
``enqueue_batch`` writes a whole call (all or nothing: it raises ``QP001`` "queue full"
and the statement rolls back), ``take_messages`` reads (and for Fetch deletes) an inbox's
oldest messages within a byte budget.

``take_calls`` does the reads of one event-loop turn in one statement.

``enqueue_batch`` announces stored messages with ``pg_notify('qpc_arrivals', ...)`` (sent
at commit) so other servers wake their long polls and push to their connections.
"""

from __future__ import annotations

SCHEMA_VERSION = 6
NOTIFY_CHANNEL = "qpc_arrivals"

_V1 = r"""
CREATE TABLE inboxes (
    recipient_key bytea NOT NULL,
    channel_id    bytea NOT NULL,
    next_seq      bigint NOT NULL,
    depth         bigint NOT NULL,
    PRIMARY KEY (recipient_key, channel_id)
);

CREATE TABLE messages (
    recipient_key bytea NOT NULL,
    channel_id    bytea NOT NULL,
    seq           bigint NOT NULL,
    expires_at    double precision,
    created_at    double precision NOT NULL,
    payload       bytea NOT NULL,
    PRIMARY KEY (recipient_key, channel_id, seq)
);
CREATE INDEX messages_expiry ON messages (expires_at) WHERE expires_at IS NOT NULL;

-- Stored messages per inbox (expired but not yet collected included), kept by this trigger
-- for every delete (fetch, ack, expiry) and by enqueue_batch / restore for inserts.
CREATE FUNCTION messages_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Lock the inboxes in key order first (as enqueue_calls does): no deadlock cycle.
    PERFORM 1 FROM inboxes AS i
        WHERE (i.recipient_key, i.channel_id) IN (SELECT recipient_key, channel_id FROM gone)
        ORDER BY i.recipient_key, i.channel_id FOR UPDATE;
    UPDATE inboxes AS i SET depth = i.depth - d.n
    FROM (SELECT recipient_key, channel_id, count(*) AS n FROM gone
          GROUP BY recipient_key, channel_id) AS d
    WHERE i.recipient_key = d.recipient_key AND i.channel_id = d.channel_id;
    RETURN NULL;
END $$;
CREATE TRIGGER messages_depth AFTER DELETE ON messages
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION messages_deleted();

CREATE TABLE dedup (
    recipient_key bytea NOT NULL,
    channel_id    bytea NOT NULL,
    message_id    bytea NOT NULL,
    seq           bigint NOT NULL,
    created_at    double precision NOT NULL,
    PRIMARY KEY (recipient_key, channel_id, message_id)
);
CREATE INDEX dedup_created ON dedup (created_at);

CREATE TABLE key_packages (
    id           bigserial PRIMARY KEY,
    identity_key bytea NOT NULL,
    package      bytea NOT NULL,
    fingerprint  bytea NOT NULL
);
CREATE INDEX key_packages_identity ON key_packages (identity_key, id);

CREATE TABLE hybrid_keys (
    identity_key bytea PRIMARY KEY,
    public_key   bytea NOT NULL
);

CREATE TABLE users (
    username     text PRIMARY KEY,
    identity_key bytea NOT NULL UNIQUE,
    created_at   double precision NOT NULL
);

CREATE TABLE channels (
    channel_id bytea PRIMARY KEY,
    created_by bytea NOT NULL,
    created_at double precision NOT NULL
);
CREATE TABLE channel_members (
    channel_id   bytea NOT NULL REFERENCES channels ON DELETE CASCADE,
    identity_key bytea NOT NULL,
    PRIMARY KEY (channel_id, identity_key)
);
CREATE INDEX channel_members_identity ON channel_members (identity_key);

CREATE TABLE sessions (
    token_hash   bytea PRIMARY KEY,
    identity_key bytea NOT NULL,
    username     text NOT NULL,
    created_at   double precision NOT NULL,
    expires_at   double precision NOT NULL
);
CREATE INDEX sessions_identity ON sessions (identity_key);
CREATE INDEX sessions_expiry ON sessions (expires_at);

CREATE TABLE kv (
    namespace text NOT NULL,
    key       bytea NOT NULL,
    value     bytea NOT NULL,
    PRIMARY KEY (namespace, key)
);

CREATE TABLE log_heads (
    log  text PRIMARY KEY,
    size bigint NOT NULL
);
CREATE TABLE logs (
    log   text NOT NULL,
    idx   bigint NOT NULL,
    entry bytea NOT NULL,
    PRIMARY KEY (log, idx)
);

-- One Enqueue / BatchEnqueue call.  Per message: reserve the inbox's next seq (the upsert
-- locks the inbox row until commit, so seqs are unique and in commit order even across
-- servers), claim the message id (a fresh record means a duplicate: the reservation is
-- undone and the original seq returned), check the depth limit, store.  An inbox named in
-- p_take_* that holds no message gets its messages handed over instead (taken = true).
CREATE FUNCTION enqueue_batch(
    p_recipients bytea[], p_channels bytea[], p_mids bytea[], p_payloads bytea[],
    p_expires double precision[], p_now double precision, p_since double precision,
    p_max_depth bigint, p_take_r bytea[], p_take_c bytea[], p_node text
) RETURNS TABLE (o_seq bigint, o_duplicate boolean, o_taken boolean)
LANGUAGE plpgsql AS $$
DECLARE
    i int;
    r bytea;
    c bytea;
    mid bytea;
    s bigint;
    d bigint;
    in_take boolean;
    taken boolean;
    n int;
    live bigint;
    stored_r bytea[] := '{}';
    stored_c bytea[] := '{}';
    stored_s bigint[] := '{}';
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_recipients, 1), 0) LOOP
        r := p_recipients[i];
        c := p_channels[i];
        mid := p_mids[i];
        in_take := EXISTS (SELECT 1 FROM unnest(p_take_r, p_take_c) AS t(tr, tc)
                           WHERE t.tr = r AND t.tc = c);
        INSERT INTO inboxes AS b (recipient_key, channel_id, next_seq, depth)
            VALUES (r, c, 2, CASE WHEN in_take THEN 0 ELSE 1 END)
            ON CONFLICT (recipient_key, channel_id) DO UPDATE
            SET next_seq = b.next_seq + 1,
                depth = b.depth + CASE WHEN in_take AND b.depth = 0 THEN 0 ELSE 1 END
            RETURNING b.next_seq - 1, b.depth INTO s, d;
        taken := in_take AND d = 0;
        IF length(mid) > 0 THEN
            INSERT INTO dedup AS x (recipient_key, channel_id, message_id, seq, created_at)
                VALUES (r, c, mid, s, p_now)
                ON CONFLICT (recipient_key, channel_id, message_id) DO UPDATE
                SET seq = excluded.seq, created_at = excluded.created_at
                WHERE x.created_at < p_since;
            GET DIAGNOSTICS n = ROW_COUNT;
            IF n = 0 THEN
                UPDATE inboxes SET next_seq = next_seq - 1,
                                   depth = depth - CASE WHEN taken THEN 0 ELSE 1 END
                    WHERE recipient_key = r AND channel_id = c;
                SELECT x.seq INTO s FROM dedup AS x
                    WHERE x.recipient_key = r AND x.channel_id = c AND x.message_id = mid;
                o_seq := s; o_duplicate := true; o_taken := false;
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;
        IF NOT taken THEN
            IF d > p_max_depth THEN
                SELECT count(*) INTO live FROM messages AS m
                    WHERE m.recipient_key = r AND m.channel_id = c
                    AND (m.expires_at IS NULL OR m.expires_at > p_now);
                IF live + 1 > p_max_depth THEN
                    RAISE EXCEPTION USING ERRCODE = 'QP001', MESSAGE = live::text,
                        DETAIL = encode(r, 'hex') || ' ' || encode(c, 'hex');
                END IF;
            END IF;
            INSERT INTO messages (recipient_key, channel_id, seq, expires_at, created_at,
                                  payload)
                VALUES (r, c, s, p_expires[i], p_now, p_payloads[i]);
            stored_r := stored_r || r;
            stored_c := stored_c || c;
            stored_s := stored_s || s;
        END IF;
        o_seq := s; o_duplicate := false; o_taken := taken;
        RETURN NEXT;
    END LOOP;
    PERFORM pg_notify('qpc_arrivals',
                      p_node || ' ' || encode(q.r, 'hex') || ' ' || encode(q.c, 'hex') || ' '
                      || q.s)
        FROM (SELECT a.r, a.c, max(a.s) AS s FROM unnest(stored_r, stored_c, stored_s)
              AS a(r, c, s) GROUP BY a.r, a.c) AS q;
END $$;

-- Several Enqueue/BatchEnqueue calls in one statement and one commit (the calls of one
-- event-loop turn, "group commit"), each still all or nothing: a call whose inbox is full
-- is rolled back to its own savepoint and reported (o_full = the live depth, o_full_inbox
-- = "recipient channel" in hex) while the others commit.  p_bounds[k] is the index of call
-- k's first message in the flat arrays; p_take_call names the call of each take inbox.
CREATE FUNCTION enqueue_calls(
    p_bounds int[], p_recipients bytea[], p_channels bytea[], p_mids bytea[],
    p_payloads bytea[], p_expires double precision[], p_now double precision,
    p_since double precision[], p_max_depth bigint[], p_take_call int[], p_take_r bytea[],
    p_take_c bytea[], p_node text
) RETURNS TABLE (o_call int, o_seq bigint, o_duplicate boolean, o_taken boolean,
                 o_full bigint, o_full_inbox text)
LANGUAGE plpgsql AS $$
DECLARE
    k int;
    n_calls int := coalesce(array_length(p_bounds, 1), 0);
    lo int;
    hi int;
    i int;
    seqs bigint[];
    dups boolean[];
    takens boolean[];
    detail text;
BEGIN
    -- Lock (or create) every inbox of the statement first, in key order: concurrent
    -- statements then never wait on each other in a cycle (no deadlock between two
    -- servers' or two loop turns' batches).  A created inbox (next_seq 1, depth 0) is the
    -- same as none, also if its call then fails.
    INSERT INTO inboxes AS b (recipient_key, channel_id, next_seq, depth)
        SELECT DISTINCT x.r, x.c, 1, 0 FROM unnest(p_recipients, p_channels) AS x(r, c)
        ORDER BY x.r, x.c
        ON CONFLICT (recipient_key, channel_id) DO UPDATE SET next_seq = b.next_seq;
    FOR k IN 1 .. n_calls LOOP
        lo := p_bounds[k];
        hi := CASE WHEN k < n_calls THEN p_bounds[k + 1] - 1
                   ELSE array_length(p_recipients, 1) END;
        o_call := k;
        BEGIN
            SELECT array_agg(e.s ORDER BY e.ord), array_agg(e.d ORDER BY e.ord),
                   array_agg(e.t ORDER BY e.ord)
              INTO seqs, dups, takens
              FROM enqueue_batch(
                    p_recipients[lo:hi], p_channels[lo:hi], p_mids[lo:hi],
                    p_payloads[lo:hi], p_expires[lo:hi], p_now, p_since[k], p_max_depth[k],
                    ARRAY(SELECT t.r FROM unnest(p_take_call, p_take_r) AS t(c, r)
                          WHERE t.c = k),
                    ARRAY(SELECT t.ch FROM unnest(p_take_call, p_take_c) AS t(c, ch)
                          WHERE t.c = k),
                    p_node) WITH ORDINALITY AS e(s, d, t, ord);
        EXCEPTION WHEN SQLSTATE 'QP001' THEN
            GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL;
            o_seq := 0; o_duplicate := false; o_taken := false;
            o_full := SQLERRM::bigint; o_full_inbox := detail;
            RETURN NEXT;
            CONTINUE;
        END;
        FOR i IN 1 .. coalesce(array_length(seqs, 1), 0) LOOP
            o_seq := seqs[i]; o_duplicate := dups[i]; o_taken := takens[i];
            o_full := NULL; o_full_inbox := NULL;
            RETURN NEXT;
        END LOOP;
    END LOOP;
END $$;

-- Oldest unexpired messages of one inbox, at most p_limit (0 = all) and, after the first,
-- within p_max_bytes of payload (0 = no cap); deleted when p_remove.  Rows another
-- Fetch deleted meanwhile are left out (never returned twice).
CREATE FUNCTION take_messages(
    p_r bytea, p_c bytea, p_limit int, p_now double precision, p_max_bytes bigint,
    p_remove boolean
) RETURNS TABLE (o_seq bigint, o_payload bytea)
LANGUAGE plpgsql AS $$
DECLARE
    rec record;
    total bigint := 0;
    seqs bigint[] := '{}';
BEGIN
    FOR rec IN
        SELECT m.seq, octet_length(m.payload) AS size FROM messages AS m
        WHERE m.recipient_key = p_r AND m.channel_id = p_c
          AND (m.expires_at IS NULL OR m.expires_at > p_now)
        ORDER BY m.seq
        LIMIT CASE WHEN p_limit > 0 THEN p_limit END
    LOOP
        IF p_max_bytes > 0 AND cardinality(seqs) > 0 AND total + rec.size > p_max_bytes THEN
            EXIT;
        END IF;
        total := total + rec.size;
        seqs := seqs || rec.seq;
    END LOOP;
    IF cardinality(seqs) = 0 THEN
        RETURN;
    END IF;
    IF p_remove THEN
        -- The inbox first (the choice above took no lock; an empty inbox takes none at
        -- all), then its messages.  Everything up to the last chosen seq goes: the chosen
        -- messages and expired ones between them (as the SQLCipher store does); a chosen one
        -- another server removed meanwhile is simply not returned.
        PERFORM 1 FROM inboxes WHERE recipient_key = p_r AND channel_id = p_c FOR UPDATE;
        RETURN QUERY WITH gone AS (
            DELETE FROM messages AS m
            WHERE m.recipient_key = p_r AND m.channel_id = p_c
              AND m.seq <= seqs[cardinality(seqs)]
            RETURNING m.seq, m.payload)
            SELECT gone.seq, gone.payload FROM gone WHERE gone.seq = ANY (seqs);
    ELSE
        RETURN QUERY SELECT m.seq, m.payload FROM messages AS m
            WHERE m.recipient_key = p_r AND m.channel_id = p_c AND m.seq = ANY (seqs);
    END IF;
END $$;
"""

# Every Fetch/FetchWait/Peek of one event-loop turn in one statement (and, for removals, one
# commit), and one lock order for everything that removes messages: a transaction that
# removes messages locks their inbox rows first, in key order, then deletes (enqueue_calls
# already locks inboxes in key order before writing).  With several inboxes per transaction
# (take_calls, purge_expired_chunk) deleting first and locking after (the depth trigger)
# could form a cycle with another transaction doing the same in another order.
_V2 = r"""
CREATE OR REPLACE FUNCTION take_messages(
    p_r bytea, p_c bytea, p_limit int, p_now double precision, p_max_bytes bigint,
    p_remove boolean
) RETURNS TABLE (o_seq bigint, o_payload bytea)
LANGUAGE plpgsql AS $$
DECLARE
    rec record;
    total bigint := 0;
    seqs bigint[] := '{}';
BEGIN
    FOR rec IN
        SELECT m.seq, octet_length(m.payload) AS size FROM messages AS m
        WHERE m.recipient_key = p_r AND m.channel_id = p_c
          AND (m.expires_at IS NULL OR m.expires_at > p_now)
        ORDER BY m.seq
        LIMIT CASE WHEN p_limit > 0 THEN p_limit END
    LOOP
        IF p_max_bytes > 0 AND cardinality(seqs) > 0 AND total + rec.size > p_max_bytes THEN
            EXIT;
        END IF;
        total := total + rec.size;
        seqs := seqs || rec.seq;
    END LOOP;
    IF cardinality(seqs) = 0 THEN
        RETURN;
    END IF;
    IF p_remove THEN
        -- The inbox first (the choice above took no lock; an empty inbox takes none at
        -- all), then its messages.  Everything up to the last chosen seq goes: the chosen
        -- messages and expired ones between them (as the SQLCipher store does); a chosen one
        -- another server removed meanwhile is simply not returned.
        PERFORM 1 FROM inboxes WHERE recipient_key = p_r AND channel_id = p_c FOR UPDATE;
        RETURN QUERY WITH gone AS (
            DELETE FROM messages AS m
            WHERE m.recipient_key = p_r AND m.channel_id = p_c
              AND m.seq <= seqs[cardinality(seqs)]
            RETURNING m.seq, m.payload)
            SELECT gone.seq, gone.payload FROM gone WHERE gone.seq = ANY (seqs);
    ELSE
        RETURN QUERY SELECT m.seq, m.payload FROM messages AS m
            WHERE m.recipient_key = p_r AND m.channel_id = p_c AND m.seq = ANY (seqs);
    END IF;
END $$;

CREATE FUNCTION take_calls(
    p_r bytea[], p_c bytea[], p_limit int[], p_now double precision[], p_max_bytes bigint[],
    p_remove boolean[]
) RETURNS TABLE (o_call int, o_seq bigint, o_payload bytea)
LANGUAGE plpgsql AS $$
DECLARE
    i int;
BEGIN
    FOR i IN SELECT k FROM generate_subscripts(p_r, 1) AS k ORDER BY p_r[k], p_c[k], k LOOP
        RETURN QUERY SELECT i, t.o_seq, t.o_payload
            FROM take_messages(p_r[i], p_c[i], p_limit[i], p_now[i], p_max_bytes[i],
                               p_remove[i]) AS t;
    END LOOP;
END $$;

CREATE FUNCTION ack_messages(p_r bytea, p_c bytea, p_up_to bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    PERFORM 1 FROM inboxes WHERE recipient_key = p_r AND channel_id = p_c FOR UPDATE;
    DELETE FROM messages WHERE recipient_key = p_r AND channel_id = p_c AND seq <= p_up_to;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- Up to p_limit expired messages: how many were chosen (the caller repeats while a whole
-- chunk was chosen) and how many this call deleted (another server may have been first).
CREATE FUNCTION purge_expired_chunk(p_now double precision, p_limit int)
RETURNS TABLE (o_chosen bigint, o_deleted bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_r bytea[];
    v_c bytea[];
    v_s bigint[];
    n bigint;
BEGIN
    SELECT array_agg(x.recipient_key), array_agg(x.channel_id), array_agg(x.seq)
        INTO v_r, v_c, v_s
        FROM (SELECT m.recipient_key, m.channel_id, m.seq FROM messages AS m
              WHERE m.expires_at IS NOT NULL AND m.expires_at <= p_now LIMIT p_limit) AS x;
    IF v_s IS NULL THEN
        RETURN QUERY SELECT 0::bigint, 0::bigint;
        RETURN;
    END IF;
    PERFORM 1 FROM inboxes AS i
        WHERE (i.recipient_key, i.channel_id) IN (SELECT * FROM unnest(v_r, v_c))
        ORDER BY i.recipient_key, i.channel_id FOR UPDATE;
    DELETE FROM messages AS m USING unnest(v_r, v_c, v_s) AS v (r, c, s)
        WHERE m.recipient_key = v.r AND m.channel_id = v.c AND m.seq = v.s
          AND m.expires_at <= p_now;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN QUERY SELECT cardinality(v_s)::bigint, n;
END $$;
"""

# Reads count a per-message overhead against their byte cap (the envelope each message costs
# in the answer), so "all" (limit 0) carries as many payload bytes as its frame allows
# instead of reserving envelope room for the largest possible count.  New overloads with a
# p_per_message argument; the schema-2 functions stay for nodes still running schema 2
# (upgrade all nodes together, README).
_V3 = r"""
CREATE FUNCTION take_messages(
    p_r bytea, p_c bytea, p_limit int, p_now double precision, p_max_bytes bigint,
    p_remove boolean, p_per_message int
) RETURNS TABLE (o_seq bigint, o_payload bytea)
LANGUAGE plpgsql AS $$
DECLARE
    rec record;
    total bigint := 0;
    seqs bigint[] := '{}';
BEGIN
    FOR rec IN
        SELECT m.seq, octet_length(m.payload)::bigint + GREATEST(p_per_message, 0) AS size
            FROM messages AS m
        WHERE m.recipient_key = p_r AND m.channel_id = p_c
          AND (m.expires_at IS NULL OR m.expires_at > p_now)
        ORDER BY m.seq
        LIMIT CASE WHEN p_limit > 0 THEN p_limit END
    LOOP
        IF p_max_bytes > 0 AND cardinality(seqs) > 0 AND total + rec.size > p_max_bytes THEN
            EXIT;
        END IF;
        total := total + rec.size;
        seqs := seqs || rec.seq;
    END LOOP;
    IF cardinality(seqs) = 0 THEN
        RETURN;
    END IF;
    IF p_remove THEN
        -- As in schema 2: the inbox row first, then everything up to the last chosen seq.
        PERFORM 1 FROM inboxes WHERE recipient_key = p_r AND channel_id = p_c FOR UPDATE;
        RETURN QUERY WITH gone AS (
            DELETE FROM messages AS m
            WHERE m.recipient_key = p_r AND m.channel_id = p_c
              AND m.seq <= seqs[cardinality(seqs)]
            RETURNING m.seq, m.payload)
            SELECT gone.seq, gone.payload FROM gone WHERE gone.seq = ANY (seqs);
    ELSE
        RETURN QUERY SELECT m.seq, m.payload FROM messages AS m
            WHERE m.recipient_key = p_r AND m.channel_id = p_c AND m.seq = ANY (seqs);
    END IF;
END $$;

CREATE FUNCTION take_calls(
    p_r bytea[], p_c bytea[], p_limit int[], p_now double precision[], p_max_bytes bigint[],
    p_remove boolean[], p_per_message int[]
) RETURNS TABLE (o_call int, o_seq bigint, o_payload bytea)
LANGUAGE plpgsql AS $$
DECLARE
    i int;
BEGIN
    FOR i IN SELECT k FROM generate_subscripts(p_r, 1) AS k ORDER BY p_r[k], p_c[k], k LOOP
        RETURN QUERY SELECT i, t.o_seq, t.o_payload
            FROM take_messages(p_r[i], p_c[i], p_limit[i], p_now[i], p_max_bytes[i],
                               p_remove[i], p_per_message[i]) AS t;
    END LOOP;
END $$;
"""

# Schema 4: one rule for every writer of an inbox's messages, "lock the inbox row, then
# look": enqueue, restore, Fetch, ack, expiry and DeleteAccount all hold the inbox row lock
# while they choose and write, so what a Fetch chose cannot change before it deletes it.
#
# * take_messages (both overloads, so schema-2 and schema-3 nodes get it too) locks the inbox
#   before choosing, not after: a message put back (restore) or taken by another Fetch
#   between the choice and the delete was lost, or left a Fetch answering nothing while
#   messages waited.  It deletes only what it returns plus expired messages below the last
#   returned seq, never a live message it does not return.
# * restore_messages puts taken messages back under the inbox lock, and only into an inbox
#   that still exists and gave out that seq (a DeleteAccount meanwhile: nothing is stored;
#   a stored row without its inbox made every later enqueue to it fail).
# * enqueue_calls_v4 is enqueue_calls that also reports an unexpected error of one call
#   (o_error) instead of failing the calls batched with it (new name: a schema-3 node keeps
#   calling enqueue_calls, whose answer it understands).
# * Every function runs with the schema's search_path (SET ... FROM CURRENT: the migration's
#   path), so the depth trigger and the functions work whatever the caller's search_path is.
# * Repair left-overs of the restore defect: messages without an inbox go (their account was
#   deleted), and an inbox whose next seq is not above its stored seqs is moved past them.
_V4 = r"""
CREATE OR REPLACE FUNCTION take_messages(
    p_r bytea, p_c bytea, p_limit int, p_now double precision, p_max_bytes bigint,
    p_remove boolean, p_per_message int
) RETURNS TABLE (o_seq bigint, o_payload bytea)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    rec record;
    total bigint := 0;
    seqs bigint[] := '{}';
BEGIN
    IF p_remove THEN
        -- An inbox without a live message takes no lock at all.
        IF NOT EXISTS (SELECT 1 FROM messages AS m
                       WHERE m.recipient_key = p_r AND m.channel_id = p_c
                         AND (m.expires_at IS NULL OR m.expires_at > p_now)) THEN
            RETURN;
        END IF;
        -- The inbox row first: the choice below (a new snapshot, after any wait) then sees
        -- every message committed before, and nothing else changes them until commit.
        PERFORM 1 FROM inboxes WHERE recipient_key = p_r AND channel_id = p_c FOR UPDATE;
    END IF;
    FOR rec IN
        SELECT m.seq, octet_length(m.payload)::bigint + GREATEST(p_per_message, 0) AS size
            FROM messages AS m
        WHERE m.recipient_key = p_r AND m.channel_id = p_c
          AND (m.expires_at IS NULL OR m.expires_at > p_now)
        ORDER BY m.seq
        LIMIT CASE WHEN p_limit > 0 THEN p_limit END
    LOOP
        IF p_max_bytes > 0 AND cardinality(seqs) > 0 AND total + rec.size > p_max_bytes THEN
            EXIT;
        END IF;
        total := total + rec.size;
        seqs := seqs || rec.seq;
    END LOOP;
    IF cardinality(seqs) = 0 THEN
        RETURN;
    END IF;
    IF p_remove THEN
        -- The chosen messages and the expired ones between them (as the SQLCipher store
        -- does); never a live message that is not returned.
        RETURN QUERY WITH gone AS (
            DELETE FROM messages AS m
            WHERE m.recipient_key = p_r AND m.channel_id = p_c
              AND m.seq <= seqs[cardinality(seqs)]
              AND (m.seq = ANY (seqs) OR m.expires_at <= p_now)
            RETURNING m.seq, m.payload)
            SELECT gone.seq, gone.payload FROM gone WHERE gone.seq = ANY (seqs);
    ELSE
        RETURN QUERY SELECT m.seq, m.payload FROM messages AS m
            WHERE m.recipient_key = p_r AND m.channel_id = p_c AND m.seq = ANY (seqs);
    END IF;
END $$;

-- Schema 2's reads (payload bytes only): the same with no per-message bytes.
CREATE OR REPLACE FUNCTION take_messages(
    p_r bytea, p_c bytea, p_limit int, p_now double precision, p_max_bytes bigint,
    p_remove boolean
) RETURNS TABLE (o_seq bigint, o_payload bytea)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    RETURN QUERY SELECT t.o_seq, t.o_payload
        FROM take_messages(p_r, p_c, p_limit, p_now, p_max_bytes, p_remove, 0) AS t;
END $$;

-- Put back messages enqueue took (a waiting reader that left), under their seqs: the inbox
-- rows locked first, in key order; a message whose inbox is gone (DeleteAccount), whose seq
-- the inbox has not given out (a new inbox of the same name) or is stored again is not
-- stored.  Returns how many were stored.
CREATE FUNCTION restore_messages(
    p_r bytea[], p_c bytea[], p_seqs bigint[], p_expires double precision[],
    p_payloads bytea[], p_now double precision, p_node text
) RETURNS bigint
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    put_r bytea[];
    put_c bytea[];
    put_s bigint[];
BEGIN
    PERFORM 1 FROM inboxes AS i
        WHERE (i.recipient_key, i.channel_id) IN (SELECT * FROM unnest(p_r, p_c))
        ORDER BY i.recipient_key, i.channel_id FOR UPDATE;
    WITH put AS (
        INSERT INTO messages (recipient_key, channel_id, seq, expires_at, created_at, payload)
            SELECT v.r, v.c, v.s, v.e, p_now, v.p
            FROM unnest(p_r, p_c, p_seqs, p_expires, p_payloads) AS v(r, c, s, e, p)
            JOIN inboxes AS i ON i.recipient_key = v.r AND i.channel_id = v.c
            WHERE v.s < i.next_seq
            ON CONFLICT (recipient_key, channel_id, seq) DO NOTHING
            RETURNING recipient_key, channel_id, seq)
    SELECT array_agg(put.recipient_key), array_agg(put.channel_id), array_agg(put.seq)
        INTO put_r, put_c, put_s FROM put;
    IF put_s IS NULL THEN
        RETURN 0;
    END IF;
    UPDATE inboxes AS i SET depth = i.depth + d.n
        FROM (SELECT a.r, a.c, count(*) AS n FROM unnest(put_r, put_c) AS a(r, c)
              GROUP BY a.r, a.c) AS d
        WHERE i.recipient_key = d.r AND i.channel_id = d.c;
    PERFORM pg_notify('qpc_arrivals',
                      p_node || ' ' || encode(q.r, 'hex') || ' ' || encode(q.c, 'hex') || ' '
                      || q.s)
        FROM (SELECT a.r, a.c, max(a.s) AS s FROM unnest(put_r, put_c, put_s) AS a(r, c, s)
              GROUP BY a.r, a.c) AS q;
    RETURN cardinality(put_s);
END $$;

-- enqueue_calls (schema 1), plus: a call that fails for any other reason than a full inbox
-- is rolled back to its own savepoint and reported (o_error = "SQLSTATE message") while the
-- others commit.  A deadlock or serialization failure still fails the statement (the
-- caller runs it again whole).
CREATE FUNCTION enqueue_calls_v4(
    p_bounds int[], p_recipients bytea[], p_channels bytea[], p_mids bytea[],
    p_payloads bytea[], p_expires double precision[], p_now double precision,
    p_since double precision[], p_max_depth bigint[], p_take_call int[], p_take_r bytea[],
    p_take_c bytea[], p_node text
) RETURNS TABLE (o_call int, o_seq bigint, o_duplicate boolean, o_taken boolean,
                 o_full bigint, o_full_inbox text, o_error text)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    k int;
    n_calls int := coalesce(array_length(p_bounds, 1), 0);
    lo int;
    hi int;
    i int;
    seqs bigint[];
    dups boolean[];
    takens boolean[];
    detail text;
BEGIN
    INSERT INTO inboxes AS b (recipient_key, channel_id, next_seq, depth)
        SELECT DISTINCT x.r, x.c, 1, 0 FROM unnest(p_recipients, p_channels) AS x(r, c)
        ORDER BY x.r, x.c
        ON CONFLICT (recipient_key, channel_id) DO UPDATE SET next_seq = b.next_seq;
    FOR k IN 1 .. n_calls LOOP
        lo := p_bounds[k];
        hi := CASE WHEN k < n_calls THEN p_bounds[k + 1] - 1
                   ELSE array_length(p_recipients, 1) END;
        o_call := k;
        o_full := NULL; o_full_inbox := NULL; o_error := NULL;
        BEGIN
            SELECT array_agg(e.s ORDER BY e.ord), array_agg(e.d ORDER BY e.ord),
                   array_agg(e.t ORDER BY e.ord)
              INTO seqs, dups, takens
              FROM enqueue_batch(
                    p_recipients[lo:hi], p_channels[lo:hi], p_mids[lo:hi],
                    p_payloads[lo:hi], p_expires[lo:hi], p_now, p_since[k], p_max_depth[k],
                    ARRAY(SELECT t.r FROM unnest(p_take_call, p_take_r) AS t(c, r)
                          WHERE t.c = k),
                    ARRAY(SELECT t.ch FROM unnest(p_take_call, p_take_c) AS t(c, ch)
                          WHERE t.c = k),
                    p_node) WITH ORDINALITY AS e(s, d, t, ord);
        EXCEPTION
            WHEN SQLSTATE 'QP001' THEN
                GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL;
                o_seq := 0; o_duplicate := false; o_taken := false;
                o_full := SQLERRM::bigint; o_full_inbox := detail;
                RETURN NEXT;
                CONTINUE;
            WHEN serialization_failure OR deadlock_detected THEN
                RAISE;
            WHEN OTHERS THEN
                o_seq := 0; o_duplicate := false; o_taken := false;
                o_error := SQLSTATE || ' ' || SQLERRM;
                RETURN NEXT;
                CONTINUE;
        END;
        FOR i IN 1 .. coalesce(array_length(seqs, 1), 0) LOOP
            o_seq := seqs[i]; o_duplicate := dups[i]; o_taken := takens[i];
            RETURN NEXT;
        END LOOP;
    END LOOP;
END $$;

ALTER FUNCTION messages_deleted() SET search_path FROM CURRENT;
ALTER FUNCTION enqueue_batch(bytea[], bytea[], bytea[], bytea[], double precision[],
    double precision, double precision, bigint, bytea[], bytea[], text)
    SET search_path FROM CURRENT;
ALTER FUNCTION enqueue_calls(int[], bytea[], bytea[], bytea[], bytea[], double precision[],
    double precision, double precision[], bigint[], int[], bytea[], bytea[], text)
    SET search_path FROM CURRENT;
ALTER FUNCTION take_calls(bytea[], bytea[], int[], double precision[], bigint[], boolean[])
    SET search_path FROM CURRENT;
ALTER FUNCTION take_calls(bytea[], bytea[], int[], double precision[], bigint[], boolean[],
    int[]) SET search_path FROM CURRENT;
ALTER FUNCTION ack_messages(bytea, bytea, bigint) SET search_path FROM CURRENT;
ALTER FUNCTION purge_expired_chunk(double precision, int) SET search_path FROM CURRENT;

DELETE FROM messages AS m WHERE NOT EXISTS (
    SELECT 1 FROM inboxes AS i
    WHERE i.recipient_key = m.recipient_key AND i.channel_id = m.channel_id);
UPDATE inboxes AS i SET next_seq = t.top + 1
    FROM (SELECT recipient_key, channel_id, max(seq) AS top FROM messages
          GROUP BY recipient_key, channel_id) AS t
    WHERE i.recipient_key = t.recipient_key AND i.channel_id = t.channel_id
      AND i.next_seq <= t.top;
"""

# Schema 5: "lock the inbox row, then look" also when the lock finds no row.  In READ
# COMMITTED a row lock that waited for a transaction which deleted the row (DeleteAccount,
# possibly followed by an enqueue creating the inbox again) locks nothing, and the next
# statement's new snapshot sees the re-created inbox and its messages: schema 4's
# take_messages then deleted messages of an inbox it had not locked (its depth trigger took
# the lock after the delete, the reverse of everyone else's order: deadlocks with
# DeleteAccount and ack), and restore_messages stored a message into an inbox it had not
# locked (a DeleteAccount running meanwhile left the row without an inbox, after which every
# enqueue to that inbox failed on messages_pkey).
#
# * take_messages and ack_messages return nothing when their lock found no inbox row.
# * restore_messages stores only into the inboxes its lock statement locked, with the next
#   seq read under that lock.
# * purge_expired_chunk deletes only messages of inboxes it locked (or of none at all: rows
#   without an inbox, which nothing else removes).
# * Repair: messages without an inbox (left by schema 4's restore) go, next seqs move past
#   stored seqs, and every inbox's depth becomes its number of stored messages (schema 4
#   repaired next_seq but not depth for inboxes that adopted rows left by the schema-3
#   restore: a too-small depth let a waiting reader be handed a new message ahead of stored
#   ones, and could go negative).  The inboxes to repair are locked first, so the count (in
#   the next statement's snapshot) is exact although older nodes may still be writing.
_V5 = r"""
CREATE OR REPLACE FUNCTION take_messages(
    p_r bytea, p_c bytea, p_limit int, p_now double precision, p_max_bytes bigint,
    p_remove boolean, p_per_message int
) RETURNS TABLE (o_seq bigint, o_payload bytea)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    rec record;
    total bigint := 0;
    seqs bigint[] := '{}';
BEGIN
    IF p_remove THEN
        IF NOT EXISTS (SELECT 1 FROM messages AS m
                       WHERE m.recipient_key = p_r AND m.channel_id = p_c
                         AND (m.expires_at IS NULL OR m.expires_at > p_now)) THEN
            RETURN;
        END IF;
        PERFORM 1 FROM inboxes WHERE recipient_key = p_r AND channel_id = p_c FOR UPDATE;
        IF NOT FOUND THEN
            -- The inbox was deleted (and maybe created again) while this waited for its
            -- lock: what it held is gone, and a new inbox is not locked here.  Read as
            -- before the new inbox existed: nothing.
            RETURN;
        END IF;
    END IF;
    FOR rec IN
        SELECT m.seq, octet_length(m.payload)::bigint + GREATEST(p_per_message, 0) AS size
            FROM messages AS m
        WHERE m.recipient_key = p_r AND m.channel_id = p_c
          AND (m.expires_at IS NULL OR m.expires_at > p_now)
        ORDER BY m.seq
        LIMIT CASE WHEN p_limit > 0 THEN p_limit END
    LOOP
        IF p_max_bytes > 0 AND cardinality(seqs) > 0 AND total + rec.size > p_max_bytes THEN
            EXIT;
        END IF;
        total := total + rec.size;
        seqs := seqs || rec.seq;
    END LOOP;
    IF cardinality(seqs) = 0 THEN
        RETURN;
    END IF;
    IF p_remove THEN
        RETURN QUERY WITH gone AS (
            DELETE FROM messages AS m
            WHERE m.recipient_key = p_r AND m.channel_id = p_c
              AND m.seq <= seqs[cardinality(seqs)]
              AND (m.seq = ANY (seqs) OR m.expires_at <= p_now)
            RETURNING m.seq, m.payload)
            SELECT gone.seq, gone.payload FROM gone WHERE gone.seq = ANY (seqs);
    ELSE
        RETURN QUERY SELECT m.seq, m.payload FROM messages AS m
            WHERE m.recipient_key = p_r AND m.channel_id = p_c AND m.seq = ANY (seqs);
    END IF;
END $$;

CREATE OR REPLACE FUNCTION ack_messages(p_r bytea, p_c bytea, p_up_to bigint) RETURNS bigint
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    n bigint;
BEGIN
    PERFORM 1 FROM inboxes WHERE recipient_key = p_r AND channel_id = p_c FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;  -- no inbox (deleted meanwhile): nothing of it is stored
    END IF;
    DELETE FROM messages WHERE recipient_key = p_r AND channel_id = p_c AND seq <= p_up_to;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- Put back messages enqueue took, under their seqs: only into the inboxes locked here (in key
-- order), and only a seq such an inbox has given out.  Returns how many were stored.
CREATE OR REPLACE FUNCTION restore_messages(
    p_r bytea[], p_c bytea[], p_seqs bigint[], p_expires double precision[],
    p_payloads bytea[], p_now double precision, p_node text
) RETURNS bigint
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    lk_r bytea[];
    lk_c bytea[];
    lk_n bigint[];
    put_r bytea[];
    put_c bytea[];
    put_s bigint[];
BEGIN
    -- The rows this statement locked, with their next seq as of the lock (it cannot change
    -- before commit); an inbox deleted while this waited is not among them, nor is one
    -- created after this statement's snapshot.
    SELECT array_agg(l.recipient_key ORDER BY l.recipient_key, l.channel_id),
           array_agg(l.channel_id ORDER BY l.recipient_key, l.channel_id),
           array_agg(l.next_seq ORDER BY l.recipient_key, l.channel_id)
        INTO lk_r, lk_c, lk_n
        FROM (SELECT i.recipient_key, i.channel_id, i.next_seq FROM inboxes AS i
              WHERE (i.recipient_key, i.channel_id) IN (SELECT * FROM unnest(p_r, p_c))
              ORDER BY i.recipient_key, i.channel_id FOR UPDATE) AS l;
    IF lk_r IS NULL THEN
        RETURN 0;
    END IF;
    WITH put AS (
        INSERT INTO messages (recipient_key, channel_id, seq, expires_at, created_at, payload)
            SELECT v.r, v.c, v.s, v.e, p_now, v.p
            FROM unnest(p_r, p_c, p_seqs, p_expires, p_payloads) AS v(r, c, s, e, p)
            JOIN unnest(lk_r, lk_c, lk_n) AS k(r, c, n) ON k.r = v.r AND k.c = v.c
            WHERE v.s < k.n
            ON CONFLICT (recipient_key, channel_id, seq) DO NOTHING
            RETURNING recipient_key, channel_id, seq)
    SELECT array_agg(put.recipient_key), array_agg(put.channel_id), array_agg(put.seq)
        INTO put_r, put_c, put_s FROM put;
    IF put_s IS NULL THEN
        RETURN 0;
    END IF;
    UPDATE inboxes AS i SET depth = i.depth + d.n
        FROM (SELECT a.r, a.c, count(*) AS n FROM unnest(put_r, put_c) AS a(r, c)
              GROUP BY a.r, a.c) AS d
        WHERE i.recipient_key = d.r AND i.channel_id = d.c;
    PERFORM pg_notify('qpc_arrivals',
                      p_node || ' ' || encode(q.r, 'hex') || ' ' || encode(q.c, 'hex') || ' '
                      || q.s)
        FROM (SELECT a.r, a.c, max(a.s) AS s FROM unnest(put_r, put_c, put_s) AS a(r, c, s)
              GROUP BY a.r, a.c) AS q;
    RETURN cardinality(put_s);
END $$;

CREATE OR REPLACE FUNCTION purge_expired_chunk(p_now double precision, p_limit int)
RETURNS TABLE (o_chosen bigint, o_deleted bigint)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_r bytea[];
    v_c bytea[];
    v_s bigint[];
    lk_r bytea[];
    lk_c bytea[];
    n bigint;
BEGIN
    SELECT array_agg(x.recipient_key), array_agg(x.channel_id), array_agg(x.seq)
        INTO v_r, v_c, v_s
        FROM (SELECT m.recipient_key, m.channel_id, m.seq FROM messages AS m
              WHERE m.expires_at IS NOT NULL AND m.expires_at <= p_now LIMIT p_limit) AS x;
    IF v_s IS NULL THEN
        RETURN QUERY SELECT 0::bigint, 0::bigint;
        RETURN;
    END IF;
    SELECT array_agg(l.recipient_key), array_agg(l.channel_id) INTO lk_r, lk_c
        FROM (SELECT i.recipient_key, i.channel_id FROM inboxes AS i
              WHERE (i.recipient_key, i.channel_id) IN (SELECT * FROM unnest(v_r, v_c))
              ORDER BY i.recipient_key, i.channel_id FOR UPDATE) AS l;
    -- A message of an inbox created after the choice waits for the next chunk.
    DELETE FROM messages AS m USING unnest(v_r, v_c, v_s) AS v (r, c, s)
        WHERE m.recipient_key = v.r AND m.channel_id = v.c AND m.seq = v.s
          AND m.expires_at <= p_now
          AND ((v.r, v.c) IN (SELECT * FROM unnest(lk_r, lk_c))
               OR NOT EXISTS (SELECT 1 FROM inboxes AS i
                              WHERE i.recipient_key = v.r AND i.channel_id = v.c));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN QUERY SELECT cardinality(v_s)::bigint, n;
END $$;

DELETE FROM messages AS m WHERE NOT EXISTS (
    SELECT 1 FROM inboxes AS i
    WHERE i.recipient_key = m.recipient_key AND i.channel_id = m.channel_id);
SELECT 1 FROM inboxes AS i
    WHERE i.depth <> (SELECT count(*) FROM messages AS m
                      WHERE m.recipient_key = i.recipient_key AND m.channel_id = i.channel_id)
       OR i.next_seq <= (SELECT max(m.seq) FROM messages AS m
                         WHERE m.recipient_key = i.recipient_key
                           AND m.channel_id = i.channel_id)
    ORDER BY i.recipient_key, i.channel_id FOR UPDATE;
UPDATE inboxes AS i SET next_seq = t.top + 1
    FROM (SELECT recipient_key, channel_id, max(seq) AS top FROM messages
          GROUP BY recipient_key, channel_id) AS t
    WHERE i.recipient_key = t.recipient_key AND i.channel_id = t.channel_id
      AND i.next_seq <= t.top;
UPDATE inboxes AS i SET depth = t.n
    FROM (SELECT b.recipient_key, b.channel_id, count(m.seq) AS n FROM inboxes AS b
          LEFT JOIN messages AS m
            ON m.recipient_key = b.recipient_key AND m.channel_id = b.channel_id
          GROUP BY b.recipient_key, b.channel_id) AS t
    WHERE i.recipient_key = t.recipient_key AND i.channel_id = t.channel_id
      AND i.depth <> t.n;
"""

# Schema 6: inbox incarnations.  DeleteAccount removes an inbox and a later enqueue creates it
# again with its seqs restarted; a put-back (restore) of a message the old inbox had handed to
# a reader that left could then land in the new inbox, possibly on a seq the new inbox had
# already delivered (another node can delete, re-create and deliver between the hand-over's
# commit and the put-back).  Every inbox row created from now on gets an ``epoch``: the id of
# the transaction that created it (the column's default, so also for a node still on schema
# 5; no sequence shared by every enqueue of every node).  Rows from before read as epoch 0;
# the column is added without a default first, so the migration does not rewrite the table.
# enqueue_batch_v6 / enqueue_calls_v6 are schema 1's enqueue_batch and schema 4's
# enqueue_calls_v4 (append-only migrations: copied, not edited) that also return the epoch of
# a taken message's inbox from the upsert that locked it; restore_messages with epochs puts a
# message back only into that incarnation.  The schema-5 signature of restore_messages
# (nodes not yet upgraded) keeps its old behaviour.
_V6 = r"""
ALTER TABLE inboxes ADD COLUMN epoch bigint;
ALTER TABLE inboxes ALTER COLUMN epoch SET DEFAULT pg_current_xact_id()::text::bigint;

CREATE FUNCTION enqueue_batch_v6(
    p_recipients bytea[], p_channels bytea[], p_mids bytea[], p_payloads bytea[],
    p_expires double precision[], p_now double precision, p_since double precision,
    p_max_depth bigint, p_take_r bytea[], p_take_c bytea[], p_node text
) RETURNS TABLE (o_seq bigint, o_duplicate boolean, o_taken boolean, o_epoch bigint)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    i int;
    r bytea;
    c bytea;
    mid bytea;
    s bigint;
    d bigint;
    in_take boolean;
    taken boolean;
    n int;
    live bigint;
    ep bigint;
    stored_r bytea[] := '{}';
    stored_c bytea[] := '{}';
    stored_s bigint[] := '{}';
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_recipients, 1), 0) LOOP
        r := p_recipients[i];
        c := p_channels[i];
        mid := p_mids[i];
        in_take := EXISTS (SELECT 1 FROM unnest(p_take_r, p_take_c) AS t(tr, tc)
                           WHERE t.tr = r AND t.tc = c);
        INSERT INTO inboxes AS b (recipient_key, channel_id, next_seq, depth)
            VALUES (r, c, 2, CASE WHEN in_take THEN 0 ELSE 1 END)
            ON CONFLICT (recipient_key, channel_id) DO UPDATE
            SET next_seq = b.next_seq + 1,
                depth = b.depth + CASE WHEN in_take AND b.depth = 0 THEN 0 ELSE 1 END
            RETURNING b.next_seq - 1, b.depth, coalesce(b.epoch, 0) INTO s, d, ep;
        taken := in_take AND d = 0;
        IF length(mid) > 0 THEN
            INSERT INTO dedup AS x (recipient_key, channel_id, message_id, seq, created_at)
                VALUES (r, c, mid, s, p_now)
                ON CONFLICT (recipient_key, channel_id, message_id) DO UPDATE
                SET seq = excluded.seq, created_at = excluded.created_at
                WHERE x.created_at < p_since;
            GET DIAGNOSTICS n = ROW_COUNT;
            IF n = 0 THEN
                UPDATE inboxes SET next_seq = next_seq - 1,
                                   depth = depth - CASE WHEN taken THEN 0 ELSE 1 END
                    WHERE recipient_key = r AND channel_id = c;
                SELECT x.seq INTO s FROM dedup AS x
                    WHERE x.recipient_key = r AND x.channel_id = c AND x.message_id = mid;
                o_seq := s; o_duplicate := true; o_taken := false; o_epoch := NULL;
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;
        IF NOT taken THEN
            IF d > p_max_depth THEN
                SELECT count(*) INTO live FROM messages AS m
                    WHERE m.recipient_key = r AND m.channel_id = c
                    AND (m.expires_at IS NULL OR m.expires_at > p_now);
                IF live + 1 > p_max_depth THEN
                    RAISE EXCEPTION USING ERRCODE = 'QP001', MESSAGE = live::text,
                        DETAIL = encode(r, 'hex') || ' ' || encode(c, 'hex');
                END IF;
            END IF;
            INSERT INTO messages (recipient_key, channel_id, seq, expires_at, created_at,
                                  payload)
                VALUES (r, c, s, p_expires[i], p_now, p_payloads[i]);
            stored_r := stored_r || r;
            stored_c := stored_c || c;
            stored_s := stored_s || s;
        END IF;
        o_seq := s; o_duplicate := false; o_taken := taken;
        o_epoch := CASE WHEN taken THEN ep END;
        RETURN NEXT;
    END LOOP;
    PERFORM pg_notify('qpc_arrivals',
                      p_node || ' ' || encode(q.r, 'hex') || ' ' || encode(q.c, 'hex') || ' '
                      || q.s)
        FROM (SELECT a.r, a.c, max(a.s) AS s FROM unnest(stored_r, stored_c, stored_s)
              AS a(r, c, s) GROUP BY a.r, a.c) AS q;
END $$;

CREATE FUNCTION enqueue_calls_v6(
    p_bounds int[], p_recipients bytea[], p_channels bytea[], p_mids bytea[],
    p_payloads bytea[], p_expires double precision[], p_now double precision,
    p_since double precision[], p_max_depth bigint[], p_take_call int[], p_take_r bytea[],
    p_take_c bytea[], p_node text
) RETURNS TABLE (o_call int, o_seq bigint, o_duplicate boolean, o_taken boolean,
                 o_full bigint, o_full_inbox text, o_error text, o_epoch bigint)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    k int;
    n_calls int := coalesce(array_length(p_bounds, 1), 0);
    lo int;
    hi int;
    i int;
    seqs bigint[];
    dups boolean[];
    takens boolean[];
    epochs bigint[];
    detail text;
BEGIN
    INSERT INTO inboxes AS b (recipient_key, channel_id, next_seq, depth)
        SELECT DISTINCT x.r, x.c, 1, 0 FROM unnest(p_recipients, p_channels) AS x(r, c)
        ORDER BY x.r, x.c
        ON CONFLICT (recipient_key, channel_id) DO UPDATE SET next_seq = b.next_seq;
    FOR k IN 1 .. n_calls LOOP
        lo := p_bounds[k];
        hi := CASE WHEN k < n_calls THEN p_bounds[k + 1] - 1
                   ELSE array_length(p_recipients, 1) END;
        o_call := k;
        o_full := NULL; o_full_inbox := NULL; o_error := NULL;
        BEGIN
            SELECT array_agg(e.s ORDER BY e.ord), array_agg(e.d ORDER BY e.ord),
                   array_agg(e.t ORDER BY e.ord), array_agg(e.ep ORDER BY e.ord)
              INTO seqs, dups, takens, epochs
              FROM enqueue_batch_v6(
                    p_recipients[lo:hi], p_channels[lo:hi], p_mids[lo:hi],
                    p_payloads[lo:hi], p_expires[lo:hi], p_now, p_since[k], p_max_depth[k],
                    ARRAY(SELECT t.r FROM unnest(p_take_call, p_take_r) AS t(c, r)
                          WHERE t.c = k),
                    ARRAY(SELECT t.ch FROM unnest(p_take_call, p_take_c) AS t(c, ch)
                          WHERE t.c = k),
                    p_node) WITH ORDINALITY AS e(s, d, t, ep, ord);
        EXCEPTION
            WHEN SQLSTATE 'QP001' THEN
                GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL;
                o_seq := 0; o_duplicate := false; o_taken := false; o_epoch := NULL;
                o_full := SQLERRM::bigint; o_full_inbox := detail;
                RETURN NEXT;
                CONTINUE;
            WHEN serialization_failure OR deadlock_detected THEN
                RAISE;
            WHEN OTHERS THEN
                o_seq := 0; o_duplicate := false; o_taken := false; o_epoch := NULL;
                o_error := SQLSTATE || ' ' || SQLERRM;
                RETURN NEXT;
                CONTINUE;
        END;
        FOR i IN 1 .. coalesce(array_length(seqs, 1), 0) LOOP
            o_seq := seqs[i]; o_duplicate := dups[i]; o_taken := takens[i];
            o_epoch := epochs[i];
            RETURN NEXT;
        END LOOP;
    END LOOP;
END $$;

-- Schema 5's put-back, plus p_epochs: a message goes back only into the incarnation of its
-- inbox that took it (a NULL epoch: any, as before).
CREATE FUNCTION restore_messages(
    p_r bytea[], p_c bytea[], p_seqs bigint[], p_expires double precision[],
    p_payloads bytea[], p_now double precision, p_node text, p_epochs bigint[]
) RETURNS bigint
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    lk_r bytea[];
    lk_c bytea[];
    lk_n bigint[];
    lk_e bigint[];
    put_r bytea[];
    put_c bytea[];
    put_s bigint[];
BEGIN
    SELECT array_agg(l.recipient_key ORDER BY l.recipient_key, l.channel_id),
           array_agg(l.channel_id ORDER BY l.recipient_key, l.channel_id),
           array_agg(l.next_seq ORDER BY l.recipient_key, l.channel_id),
           array_agg(l.epoch ORDER BY l.recipient_key, l.channel_id)
        INTO lk_r, lk_c, lk_n, lk_e
        FROM (SELECT i.recipient_key, i.channel_id, i.next_seq, coalesce(i.epoch, 0) AS epoch
              FROM inboxes AS i
              WHERE (i.recipient_key, i.channel_id) IN (SELECT * FROM unnest(p_r, p_c))
              ORDER BY i.recipient_key, i.channel_id FOR UPDATE) AS l;
    IF lk_r IS NULL THEN
        RETURN 0;
    END IF;
    WITH put AS (
        INSERT INTO messages (recipient_key, channel_id, seq, expires_at, created_at, payload)
            SELECT v.r, v.c, v.s, v.e, p_now, v.p
            FROM unnest(p_r, p_c, p_seqs, p_expires, p_payloads, p_epochs)
                AS v(r, c, s, e, p, ep)
            JOIN unnest(lk_r, lk_c, lk_n, lk_e) AS k(r, c, n, ep) ON k.r = v.r AND k.c = v.c
            WHERE v.s < k.n AND (v.ep IS NULL OR v.ep = k.ep)
            ON CONFLICT (recipient_key, channel_id, seq) DO NOTHING
            RETURNING recipient_key, channel_id, seq)
    SELECT array_agg(put.recipient_key), array_agg(put.channel_id), array_agg(put.seq)
        INTO put_r, put_c, put_s FROM put;
    IF put_s IS NULL THEN
        RETURN 0;
    END IF;
    UPDATE inboxes AS i SET depth = i.depth + d.n
        FROM (SELECT a.r, a.c, count(*) AS n FROM unnest(put_r, put_c) AS a(r, c)
              GROUP BY a.r, a.c) AS d
        WHERE i.recipient_key = d.r AND i.channel_id = d.c;
    PERFORM pg_notify('qpc_arrivals',
                      p_node || ' ' || encode(q.r, 'hex') || ' ' || encode(q.c, 'hex') || ' '
                      || q.s)
        FROM (SELECT a.r, a.c, max(a.s) AS s FROM unnest(put_r, put_c, put_s) AS a(r, c, s)
              GROUP BY a.r, a.c) AS q;
    RETURN cardinality(put_s);
END $$;

-- The schema-5 signature (a node not yet upgraded): the same, without an epoch check.
CREATE OR REPLACE FUNCTION restore_messages(
    p_r bytea[], p_c bytea[], p_seqs bigint[], p_expires double precision[],
    p_payloads bytea[], p_now double precision, p_node text
) RETURNS bigint
LANGUAGE sql SET search_path FROM CURRENT AS $$
    SELECT restore_messages(p_r, p_c, p_seqs, p_expires, p_payloads, p_now, p_node,
                            array_fill(NULL::bigint, ARRAY[cardinality(p_seqs)]));
$$;
"""

MIGRATIONS: list[tuple[int, str]] = [(1, _V1), (2, _V2), (3, _V3), (4, _V4), (5, _V5),
                                  (6, _V6)]
