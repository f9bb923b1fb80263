"""Adoption's one statement: an orphan spool's rows appended to this process's own spool.

Run by the spool writer thread (the only writer of its file), in one transaction: the orphan's
rows come in their order, renumbered to follow every seq this writer has handed out, so the
feeder reads them after the backlog already here and before anything accepted later (a bounded
share: adopted messages wait behind at most one spool's worth, and new ones behind at most the
adopted file). The columns are read from the file (every column but `seq`), so this statement
follows the format wherever file.py takes it; open_spool has upgraded the orphan to it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ingest.errors import SpoolError

ALIAS = "orphan"


def absorb(conn: sqlite3.Connection, path: Path, next_seq: int) -> int:
    """Append the rows of the spool at `path` from `next_seq` on, committed; the last seq used
    (`next_seq - 1` when it had none). Raises sqlite3.Error (rolled back) or SpoolError."""
    conn.execute(f"ATTACH DATABASE ? AS {ALIAS}", (str(path),))
    try:
        columns = _columns(conn, "main")
        if set(columns) - set(_columns(conn, ALIAS)):
            raise SpoolError(f"spool {path}: its columns differ from this spool's (not upgraded?)")
        first, last = conn.execute(f"SELECT min(seq), max(seq) FROM {ALIAS}.spool").fetchone()
        if first is None:
            return next_seq - 1
        listed = ", ".join(columns)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                f"INSERT INTO main.spool (seq, {listed}) SELECT seq - ? + ?, {listed} FROM {ALIAS}.spool ORDER BY seq",
                (first, next_seq),
            )
            if "known" in columns:
                # They may be in the database already (their owner died between its commit and
                # its delete): the store's duplicate-skipping path.
                conn.execute("UPDATE main.spool SET known = 1 WHERE seq >= ?", (next_seq,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return int(last) - int(first) + next_seq
    finally:
        conn.execute(f"DETACH DATABASE {ALIAS}")


def _columns(conn: sqlite3.Connection, schema: str) -> list[str]:
    """The spool table's columns but `seq` (the primary key, renumbered)."""
    return [row[1] for row in conn.execute(f"PRAGMA {schema}.table_info(spool)") if row[1] != "seq"]
