"""Spool files left by older versions: upgraded when opened, every message stored, exactly.

Each file is written as the code of its version wrote it: its schema and its INSERT, literally.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from ingest.spool import file as spool
from support.httpclient import request
from support.waiting import wait_until

_META = "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
# Version 2 (fb8f1e0 .. 019d7e6^): one row a message, naming its request and the request's size.
_V2_SPOOL = ("CREATE TABLE spool (seq INTEGER PRIMARY KEY, ident TEXT NOT NULL, known INTEGER NOT NULL, "
             "received_at REAL NOT NULL, payload TEXT NOT NULL, request TEXT, accepted INTEGER)")
_V2_INSERT = ("INSERT INTO spool (seq, ident, known, received_at, payload, request, accepted) "
              "VALUES (?, ?, ?, ?, ?, ?, ?)")
# Version 3 (019d7e6 .. 6641fa5^): the same, and the request's client.
_V3_SPOOL = ("CREATE TABLE spool (seq INTEGER PRIMARY KEY, ident TEXT NOT NULL, known INTEGER NOT NULL, "
             "received_at REAL NOT NULL, payload TEXT NOT NULL, request TEXT, accepted INTEGER, client TEXT)")
_V3_INSERT = ("INSERT INTO spool (seq, ident, known, received_at, payload, request, accepted, client) "
              "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
# Version 4 (6641fa5 .. this change): one row a request, its texts and identities each concatenated,
# with their lengths.
_V4_SPOOL = ("CREATE TABLE spool (seq INTEGER PRIMARY KEY, received_at REAL NOT NULL, known INTEGER NOT NULL, "
             "request TEXT, accepted INTEGER, client TEXT, messages INTEGER NOT NULL, bytes INTEGER NOT NULL, "
             "idents TEXT NOT NULL, ident_lengths TEXT NOT NULL, texts TEXT NOT NULL, text_lengths TEXT NOT NULL)")
_V4_INSERT = ("INSERT INTO spool (seq, received_at, known, request, accepted, client, messages, bytes, idents, "
              "ident_lengths, texts, text_lengths) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")

# Two requests, texts with what a careless encoding would break on: commas, digits, quotes, escapes,
# characters outside ASCII.
_REQUESTS = {
    "old-a": [{"n": 0, "s": "1,2,3"}, {"n": 1, "s": 'a "quoted", \\ text'}, {"n": 2, "s": "é€😀"}],
    "old-b": [{"n": 3, "s": ""}, {"n": 4, "s": "\n,\t"}, {"n": 5}, {"n": 6, "s": "[]{}"}],
}


def _old_file(path: Path, version: int) -> None:
    """The file an ingest of `version` left: WAL mode, its schema, a row per message (a row per
    request from version 4 on)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("BEGIN")
    conn.execute(_META)
    conn.execute({2: _V2_SPOOL, 3: _V3_SPOOL, 4: _V4_SPOOL}[version])
    conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                     [("format", "ingest-spool"), ("version", str(version))])
    if version == 4:
        conn.executemany(_V4_INSERT, _v4_rows())
        conn.execute("COMMIT")
        conn.close()
        return
    seq = 0
    rows = []
    for request_id, messages in _REQUESTS.items():
        for message in messages:
            seq += 1
            row = (seq, f"g:old:{seq}", 0, 1_700_000_000.0 + seq, json.dumps(message), request_id, len(messages))
            rows.append(row if version == 2 else (*row, None))
    conn.executemany(_V2_INSERT if version == 2 else _V3_INSERT, rows)
    conn.execute("COMMIT")
    conn.close()


def _v4_rows() -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    seq = 0
    for request_id, messages in _REQUESTS.items():
        texts = [json.dumps(message) for message in messages]
        idents = [f"g:old:{seq + n}" for n in range(1, len(messages) + 1)]
        seq += len(messages)
        rows.append((len(rows) + 1, 1_700_000_000.0 + seq, 0, request_id, len(messages), None, len(messages), 100,
                     "".join(idents), ",".join(str(len(i)) for i in idents),
                     "".join(texts), ",".join(str(len(t)) for t in texts)))
    return rows


@pytest.mark.parametrize("version", [2, 3, 4])
def test_an_old_spool_is_upgraded_in_place_and_keeps_every_message(tmp_path, version) -> None:
    path = tmp_path / "spool.db"
    _old_file(path, version)
    before = spool.status(spool.open_spool(path, create=False, writable=False))
    assert before.messages == 7  # an old file is read as it is, and counted in messages

    conn = spool.open_spool(path)
    try:
        assert conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone() == (str(spool.VERSION),)
        after = spool.status(conn)
        last = 2 if version == 4 else 7
        assert (after.messages, after.first_seq, after.last_seq) == (7, 1, last)
        rows = spool.read_after(conn, 0, last, 100)
    finally:
        conn.close()
    assert [json.loads(text) for row in rows for text in row.texts] == [m for ms in _REQUESTS.values() for m in ms]
    assert [ident for row in rows for ident in row.idents] == [f"g:old:{n}" for n in range(1, 8)]
    requests = [(row.request, row.accepted) for row in rows]
    assert requests == ([("old-a", 3), ("old-b", 4)] if version == 4 else [("old-a", 3)] * 3 + [("old-b", 4)] * 4)


@pytest.mark.parametrize("version", [2, 3, 4])
def test_an_old_spool_is_recovered_by_a_new_service(make_service, sqlite_url, tmp_path, version) -> None:
    path = tmp_path / "spool.db"
    _old_file(path, version)
    service = make_service(spool=str(path))
    wait_until(lambda: service.spool is not None and service.spool.messages == 0, 30, "the old rows stored")
    assert spool.status(spool.open_spool(path, create=False, writable=False)).messages == 0
    conn = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
    try:
        stored = conn.execute("SELECT ident, payload FROM messages ORDER BY id").fetchall()
    finally:
        conn.close()
    assert [ident for ident, _ in stored] == [f"g:old:{n}" for n in range(1, 8)]
    assert [json.loads(payload) for _, payload in stored] == [m for ms in _REQUESTS.values() for m in ms]
    for request_id, messages in _REQUESTS.items():
        reply = request(f"{service.url}/requests/{request_id}")
        assert reply.status == 200, reply.body
        assert reply.json()["stored"] == len(messages)
