//! The event store's tables and its append function.
//!
//! A position is `(xid << 16) | n`: the appending transaction's id (`xid8`) in
//! the high bits and the event's place within that transaction in the low 16. So
//! the log's order is the order of transaction ids, and readers only read below
//! the oldest transaction still in progress. `docs/postgres-ordering.md` explains
//! why that never skips an event.

use crate::schema::Migrations;

/// How many low bits of a position number an event within its transaction.
pub(crate) const INDEX_BITS: u32 = 16;

/// The most events one transaction can append.
pub(crate) const MAX_EVENTS_PER_TRANSACTION: usize = 1 << INDEX_BITS;

/// SQL for the exclusive upper bound of readable positions: everything committed
/// by transactions older than the oldest one still running.
pub(crate) const READABLE_BOUND: &str =
    "(pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 16)";

/// SQLSTATE raised by `diptych_append` for a version conflict; the message is
/// the stream's actual version. (`diptych_append_group` answers in its rows.)
pub(crate) const CONFLICT: &str = "DT001";
/// SQLSTATE raised by `diptych_append` for an idempotency key first used on
/// another stream; the message is that stream.
pub(crate) const KEY_REUSED: &str = "DT002";
/// SQLSTATE for a transaction holding more events than a position can number.
pub(crate) const TOO_MANY_EVENTS: &str = "DT003";
/// SQLSTATE for an append in a transaction that had already written: its id was
/// assigned before the stream's lock, which would break the stream's order.
pub(crate) const NOT_FIRST_WRITE: &str = "DT004";

pub(crate) const EVENTS: Migrations = Migrations {
    component: "events",
    steps: &[
        // 1: the log, idempotency keys, snapshots and the append.
        r#"
        CREATE TABLE events (
            position       bigint  PRIMARY KEY,
            stream_id      text    NOT NULL,
            version        bigint  NOT NULL,
            event_id       uuid    NOT NULL UNIQUE,
            event_type     text    NOT NULL,
            schema_version integer NOT NULL,
            payload        jsonb   NOT NULL,
            metadata       jsonb   NOT NULL,
            recorded_at    bigint  NOT NULL,
            UNIQUE (stream_id, version)
        );
        CREATE TABLE idempotency (
            key            text   PRIMARY KEY,
            stream_id      text   NOT NULL,
            first_position bigint,
            last_position  bigint
        );
        CREATE TABLE snapshots (
            stream_id     text    PRIMARY KEY,
            version       bigint  NOT NULL,
            state_version integer NOT NULL,
            state         jsonb   NOT NULL,
            taken_at      bigint  NOT NULL
        );

        -- One append, checked and written in the caller's transaction (one append
        -- per transaction: the stream lock must come before anything that assigns
        -- the transaction an id). Checks run in the contract's order: a repeated
        -- key, the expected version, then event ids (left to the unique index; the
        -- caller finds the first offender).
        -- p_expected is NULL for "any version".
        CREATE FUNCTION diptych_append(
            p_stream text, p_expected bigint, p_key text,
            p_ids uuid[], p_types text[], p_schema_versions integer[],
            p_payloads jsonb[], p_metadata jsonb[]
        ) RETURNS TABLE (
            first_position bigint, last_position bigint, first_version bigint,
            recorded_at bigint, deduplicated boolean
        ) LANGUAGE plpgsql AS $$
        DECLARE
            v_count  bigint := cardinality(p_ids);
            v_actual bigint;
            v_first  bigint;
            v_base   bigint;
            v_now    bigint;
            v_key    record;
        BEGIN
            -- The stream's lock comes first and takes no transaction id; the id is
            -- assigned right after, while the lock is held. So of two appends to one
            -- stream, the later one always has the higher id, and the log's order
            -- keeps each stream's order.
            IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
                RAISE EXCEPTION USING ERRCODE = 'DT004',
                    MESSAGE = 'diptych_append must be the first write of its transaction';
            END IF;
            PERFORM pg_advisory_xact_lock(
                hashtextextended(current_schema() || ':' || p_stream, 0));
            v_base := pg_current_xact_id()::text::bigint << 16;

            IF p_key IS NOT NULL THEN
                -- Claiming the key waits for a concurrent append holding it.
                INSERT INTO idempotency (key, stream_id) VALUES (p_key, p_stream)
                    ON CONFLICT DO NOTHING;
                IF NOT FOUND THEN
                    SELECT i.stream_id, i.first_position, i.last_position INTO v_key
                        FROM idempotency i WHERE i.key = p_key;
                    IF v_key.stream_id <> p_stream THEN
                        RAISE EXCEPTION USING ERRCODE = 'DT002', MESSAGE = v_key.stream_id;
                    END IF;
                    RETURN QUERY SELECT v_key.first_position, v_key.last_position,
                        NULL::bigint, NULL::bigint, true;
                    RETURN;
                END IF;
            END IF;

            SELECT COALESCE(max(e.version), 0) INTO v_actual FROM events e
                WHERE e.stream_id = p_stream;
            IF p_expected IS NOT NULL AND p_expected <> v_actual THEN
                RAISE EXCEPTION USING ERRCODE = 'DT001', MESSAGE = v_actual::text;
            END IF;

            -- Positions: this transaction's id, then a count within it.
            SELECT COALESCE(max(e.position) + 1, v_base) INTO v_first FROM events e
                WHERE e.position >= v_base AND e.position < v_base + 65536;
            IF v_first + v_count > v_base + 65536 THEN
                RAISE EXCEPTION USING ERRCODE = 'DT003',
                    MESSAGE = (v_first - v_base + v_count)::text;
            END IF;
            v_now := (extract(epoch FROM clock_timestamp()) * 1000000)::bigint;
            INSERT INTO events (position, stream_id, version, event_id, event_type,
                                schema_version, payload, metadata, recorded_at)
                SELECT v_first + u.n - 1, p_stream, v_actual + u.n, u.id, u.ty, u.sv,
                       u.pl, u.md, v_now
                FROM unnest(p_ids, p_types, p_schema_versions, p_payloads, p_metadata)
                     WITH ORDINALITY AS u(id, ty, sv, pl, md, n);
            IF p_key IS NOT NULL THEN
                UPDATE idempotency SET first_position = v_first,
                                       last_position = v_first + v_count - 1
                    WHERE key = p_key;
            END IF;
            RETURN QUERY SELECT v_first, v_first + v_count - 1, v_actual + 1, v_now, false;
        END;
        $$;
        "#,
        // 2: appends in groups, many per transaction (see `crate::group`).
        r#"
        -- Several appends, each checked on its own, written in the caller's
        -- transaction (which must not have written before, as for diptych_append).
        -- The appends are p_streams[i], p_expected[i] (NULL: any version),
        -- p_keys[i] (NULL: none) and p_counts[i] events: those whose
        -- p_event_appends entry is i, p_event_offsets numbering them from 0. Returns one row per append, in order: its outcome ('written',
        -- 'repeat' of an earlier append with the key, 'conflict' with the actual
        -- version as detail, 'key_reused' with the key's first stream as detail,
        -- 'busy' when its stream was locked and p_wait was false),
        -- its positions and first version, and the time stamped on the group.
        -- A duplicate event id or a key claimed meanwhile on another stream makes
        -- the whole call fail with a unique violation: the caller then appends
        -- the group's members one at a time to find whose it was.
        CREATE FUNCTION diptych_append_group(
            p_wait boolean, p_streams text[], p_expected bigint[], p_keys text[], p_counts integer[],
            p_event_appends integer[], p_event_offsets integer[],
            p_ids uuid[], p_types text[], p_schema_versions integer[],
            p_payloads jsonb[], p_metadata jsonb[]
        ) RETURNS TABLE (
            outcome text, first_position bigint, last_position bigint,
            first_version bigint, recorded_at bigint, detail text
        ) LANGUAGE plpgsql AS $$
        DECLARE
            v_lock      bigint;
            v_xid       xid8;
            v_next      bigint;
            v_now       bigint;
            v_count     integer;
            v_written   integer := 0;
            v_stream    integer;
            v_key       integer;
            -- Each stream's version as the group goes, so a second append to a
            -- stream sees the first.
            v_streams   text[];
            v_versions  bigint[];
            -- Keys already stored, then also those this group claims.
            v_keys        text[];
            v_key_streams text[];
            v_key_first   bigint[];
            v_key_last    bigint[];
            v_claimed     integer[] := '{}';
            -- The locks another transaction held, when not waiting for them.
            v_busy        bigint[] := '{}';
            v_outcome   text[] := '{}';
            v_first     bigint[] := '{}';
            v_last      bigint[] := '{}';
            v_version   bigint[] := '{}';
            v_detail    text[] := '{}';
        BEGIN
            IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
                RAISE EXCEPTION USING ERRCODE = 'DT004',
                    MESSAGE = 'diptych_append_group must be the first write of its transaction';
            END IF;
            -- Every stream's lock before the transaction id, as in diptych_append,
            -- taken in the order of their keys so that two groups sharing streams
            -- never wait for each other in a cycle. Unless p_wait, a lock another
            -- transaction holds is not waited for: the appends to that stream are
            -- answered 'busy' and write nothing, so that no append waits for
            -- another's stream.
            FOR v_lock IN
                SELECT DISTINCT hashtextextended(current_schema() || ':' || s, 0)
                FROM unnest(p_streams) AS s ORDER BY 1
            LOOP
                IF p_wait THEN
                    PERFORM pg_advisory_xact_lock(v_lock);
                ELSIF NOT pg_try_advisory_xact_lock(v_lock) THEN
                    v_busy := array_append(v_busy, v_lock);
                END IF;
            END LOOP;
            v_xid := pg_current_xact_id();
            v_next := v_xid::text::bigint << 16;
            v_now := (extract(epoch FROM clock_timestamp()) * 1000000)::bigint;

            -- Read under the locks: every earlier append to these streams has
            -- committed, so these are the streams' versions and their keys.
            SELECT array_agg(s.stream),
                   array_agg((SELECT COALESCE(max(e.version), 0) FROM events e
                              WHERE e.stream_id = s.stream))
                INTO v_streams, v_versions
                FROM (SELECT DISTINCT unnest(p_streams) AS stream) s;
            SELECT array_agg(i.key), array_agg(i.stream_id),
                   array_agg(i.first_position), array_agg(i.last_position)
                INTO v_keys, v_key_streams, v_key_first, v_key_last
                FROM idempotency i WHERE i.key = ANY(p_keys);

            -- Each append's checks, in the contract's order: a repeated key, then
            -- the expected version.
            FOR i IN 1 .. cardinality(p_streams) LOOP
                v_detail[i] := NULL;
                v_first[i] := NULL;
                v_last[i] := NULL;
                v_version[i] := NULL;
                IF cardinality(v_busy) > 0 AND hashtextextended(
                        current_schema() || ':' || p_streams[i], 0) = ANY(v_busy) THEN
                    v_outcome[i] := 'busy';
                    CONTINUE;
                END IF;
                v_key := CASE WHEN p_keys[i] IS NULL THEN NULL
                              ELSE array_position(v_keys, p_keys[i]) END;
                IF v_key IS NOT NULL THEN
                    IF v_key_streams[v_key] = p_streams[i] THEN
                        v_outcome[i] := 'repeat';
                        v_first[i] := v_key_first[v_key];
                        v_last[i] := v_key_last[v_key];
                    ELSE
                        v_outcome[i] := 'key_reused';
                        v_detail[i] := v_key_streams[v_key];
                    END IF;
                    CONTINUE;
                END IF;
                v_stream := array_position(v_streams, p_streams[i]);
                IF p_expected[i] IS NOT NULL AND p_expected[i] <> v_versions[v_stream] THEN
                    v_outcome[i] := 'conflict';
                    v_detail[i] := v_versions[v_stream]::text;
                    CONTINUE;
                END IF;
                v_count := p_counts[i];
                v_outcome[i] := 'written';
                v_first[i] := v_next;
                v_last[i] := v_next + v_count - 1;
                v_version[i] := v_versions[v_stream] + 1;
                v_next := v_next + v_count;
                v_written := v_written + v_count;
                v_versions[v_stream] := v_versions[v_stream] + v_count;
                IF p_keys[i] IS NOT NULL THEN
                    v_keys := array_append(v_keys, p_keys[i]);
                    v_key_streams := array_append(v_key_streams, p_streams[i]);
                    v_key_first := array_append(v_key_first, v_first[i]);
                    v_key_last := array_append(v_key_last, v_last[i]);
                    v_claimed := array_append(v_claimed, i);
                END IF;
            END LOOP;

            IF v_written > 65536 THEN
                RAISE EXCEPTION USING ERRCODE = 'DT003', MESSAGE = v_written::text;
            END IF;
            IF v_written > 0 THEN
                INSERT INTO events (position, stream_id, version, event_id, event_type,
                                    schema_version, payload, metadata, recorded_at)
                    SELECT v_first[u.a] + u.o, p_streams[u.a], v_version[u.a] + u.o,
                           u.id, u.ty, u.sv, u.pl, u.md, v_now
                    FROM unnest(p_event_appends, p_event_offsets, p_ids, p_types,
                                p_schema_versions, p_payloads, p_metadata)
                         AS u(a, o, id, ty, sv, pl, md)
                    WHERE v_version[u.a] IS NOT NULL;
            END IF;
            IF cardinality(v_claimed) > 0 THEN
                INSERT INTO idempotency (key, stream_id, first_position, last_position)
                    SELECT p_keys[c], p_streams[c], v_first[c], v_last[c]
                    FROM unnest(v_claimed) AS c;
            END IF;

            RETURN QUERY SELECT v_outcome[n], v_first[n], v_last[n], v_version[n], v_now,
                                v_detail[n]
                FROM generate_series(1, cardinality(p_streams)) AS n;
        END;
        $$;
        -- The statements above run for every group with arrays of every size:
        -- planned once, not at each call, they cost far less.
        ALTER FUNCTION diptych_append_group SET plan_cache_mode = force_generic_plan;
        "#,
    ],
};
