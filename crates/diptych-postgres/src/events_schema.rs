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
/// the stream's actual version.
pub(crate) const CONFLICT: &str = "DT001";
/// SQLSTATE for an idempotency key first used on another stream; the message is
/// that stream.
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
    ],
};
