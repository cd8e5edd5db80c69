"""The outbox's SQLite schema and its migrations (one transaction per version step)."""

from __future__ import annotations

SCHEMA_VERSION = 3

# New files get 2 KiB pages (see gateway/outbox.py, _open_sync): a ~1 KiB reading fills most
# of one, and every page a commit touches costs a whole WAL frame, so each index and table leaf
# a reading touches writes half as much as with 4 KiB pages. An existing file keeps its size.
NEW_FILE_PAGE_SIZE = 2048
# The highest seq ever handed out, where the table cannot show it (its top rows deleted).
SEQ_HIGH = "seq_high"

# The readings columns in table order (the page scanner in outbox_pages knows the same order).
COLUMNS = (
    "seq", "reading_id", "topic", "payload", "patient_id", "kind", "measured_at", "measured_day",
    "valid", "created_at", "delivered_at", "checksum", "quarantined_at", "quarantine_reason",
    "retry_at",
)  # fmt: skip
V1_COLUMNS = COLUMNS[:11]

# Each entry upgrades the schema from version <key> to <key> + 1, inside one transaction.
MIGRATIONS: dict[int, str] = {
    0: """
    CREATE TABLE readings (
        seq          INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: seq is never reused
        reading_id   TEXT    NOT NULL UNIQUE,
        topic        TEXT    NOT NULL,
        payload      BLOB    NOT NULL,
        patient_id   TEXT    NOT NULL,
        kind         TEXT    NOT NULL,
        measured_at  TEXT    NOT NULL,
        measured_day TEXT    NOT NULL,
        valid        INTEGER NOT NULL CHECK (valid IN (0, 1)),
        created_at   TEXT    NOT NULL,
        delivered_at TEXT
    );
    CREATE INDEX readings_pending ON readings (seq) WHERE delivered_at IS NULL;
    CREATE INDEX readings_delivered ON readings (delivered_at) WHERE delivered_at IS NOT NULL;
    CREATE INDEX readings_days ON readings (patient_id, measured_day) WHERE valid = 1;
    -- Drops and rejections are persisted: a reboot must not hide that readings were lost.
    CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    """,
    # patient_id becomes nullable, which SQLite's ALTER TABLE cannot do: the table is rebuilt
    # (https://sqlite.org/lang_altertable.html, "other kinds of table schema changes"), keeping
    # every seq and the AUTOINCREMENT high-water mark, so a seq is still never reused.
    1: """
    CREATE TABLE readings_v2 (
        seq          INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: seq is never reused
        reading_id   TEXT    NOT NULL UNIQUE,
        topic        TEXT    NOT NULL,
        payload      BLOB    NOT NULL,
        patient_id   TEXT,            -- NULL: unattributed (the device said "unknown user")
        kind         TEXT    NOT NULL,
        measured_at  TEXT    NOT NULL,
        measured_day TEXT    NOT NULL,
        valid        INTEGER NOT NULL CHECK (valid IN (0, 1)),
        created_at   TEXT    NOT NULL,
        delivered_at TEXT,
        checksum     TEXT,            -- sha256 hex of payload, NULL for rows stored by v1
        quarantined_at    TEXT,       -- set: kept, not offered by pending() before retry_at
        quarantine_reason TEXT,
        retry_at          TEXT        -- NULL with quarantined_at set: never automatically
    );
    INSERT INTO readings_v2 (seq, reading_id, topic, payload, patient_id, kind, measured_at,
                             measured_day, valid, created_at, delivered_at)
        SELECT seq, reading_id, topic, payload, patient_id, kind, measured_at, measured_day,
               valid, created_at, delivered_at FROM readings;
    DELETE FROM sqlite_sequence WHERE name = 'readings_v2';
    INSERT INTO sqlite_sequence (name, seq)
        SELECT 'readings_v2', seq FROM sqlite_sequence WHERE name = 'readings';
    DROP TABLE readings;
    ALTER TABLE readings_v2 RENAME TO readings;
    -- Partial indexes: the pending set stays small and fast however much history is kept.
    CREATE INDEX readings_pending ON readings (seq)
        WHERE delivered_at IS NULL AND patient_id IS NOT NULL;
    CREATE INDEX readings_delivered ON readings (delivered_at) WHERE delivered_at IS NOT NULL;
    CREATE INDEX readings_days ON readings (patient_id, measured_day) WHERE valid = 1;
    CREATE INDEX readings_unattributed ON readings (created_at) WHERE patient_id IS NULL;
    CREATE INDEX readings_quarantined ON readings (seq)
        WHERE quarantined_at IS NOT NULL AND delivered_at IS NULL
    """,
    # Wear (issue 8): without AUTOINCREMENT a put no longer writes sqlite_sequence's page, and
    # without readings_delivered a delivered mark no longer writes an index page; prune finds
    # old delivered rows by walking the table in seq order instead (Outbox._prune_delivered).
    # A seq is still never reused: every insert takes max(MAX(seq), counters.seq_high) + 1, and
    # a transaction that deletes the top rows records the high-water mark in counters first.
    # The table is rebuilt (AUTOINCREMENT cannot be dropped in place) keeping every row and
    # every seq; the high-water mark comes from sqlite_sequence.
    2: """
    CREATE TABLE readings_v3 (
        seq          INTEGER PRIMARY KEY,  -- never reused: see counters.seq_high
        reading_id   TEXT    NOT NULL UNIQUE,
        topic        TEXT    NOT NULL,
        payload      BLOB    NOT NULL,
        patient_id   TEXT,            -- NULL: unattributed (the device said "unknown user")
        kind         TEXT    NOT NULL,
        measured_at  TEXT    NOT NULL,
        measured_day TEXT    NOT NULL,
        valid        INTEGER NOT NULL CHECK (valid IN (0, 1)),
        created_at   TEXT    NOT NULL,
        delivered_at TEXT,
        checksum     TEXT,            -- sha256 hex of payload, NULL for rows stored by v1
        quarantined_at    TEXT,       -- set: kept, not offered by pending() before retry_at
        quarantine_reason TEXT,
        retry_at          TEXT        -- NULL with quarantined_at set: never automatically
    );
    INSERT INTO readings_v3 (seq, reading_id, topic, payload, patient_id, kind, measured_at,
                             measured_day, valid, created_at, delivered_at, checksum,
                             quarantined_at, quarantine_reason, retry_at)
        SELECT seq, reading_id, topic, payload, patient_id, kind, measured_at, measured_day,
               valid, created_at, delivered_at, checksum, quarantined_at, quarantine_reason,
               retry_at FROM readings;
    INSERT INTO counters (name, value)
        SELECT 'seq_high', MAX(COALESCE((SELECT seq FROM sqlite_sequence
                                         WHERE name = 'readings'), 0),
                               COALESCE((SELECT MAX(seq) FROM readings), 0)) WHERE true
        ON CONFLICT (name) DO UPDATE SET value = MAX(value, excluded.value);
    DROP TABLE readings;
    DELETE FROM sqlite_sequence WHERE name = 'readings';
    ALTER TABLE readings_v3 RENAME TO readings;
    CREATE INDEX readings_pending ON readings (seq)
        WHERE delivered_at IS NULL AND patient_id IS NOT NULL;
    CREATE INDEX readings_days ON readings (patient_id, measured_day) WHERE valid = 1;
    CREATE INDEX readings_unattributed ON readings (created_at) WHERE patient_id IS NULL;
    CREATE INDEX readings_quarantined ON readings (seq)
        WHERE quarantined_at IS NOT NULL AND delivered_at IS NULL
    """,
}
