"""Persistent state: SQLite in WAL mode, one table per kind of record.

Records are small JSON documents keyed by id. Everything is also held in memory by
`kiyot_py.pods`, so reads here happen only at start-up; writes are synchronous and
short (a commit in WAL mode is well under a millisecond), which keeps the state on
disk in step with what the kubelet was told.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any, TypeVar

from kiyot_py.model import Container, Image, Sandbox, from_json, to_json

# 1: the tables. 2: image records keep no credentials (version 1 kept the last pull's).
SCHEMA_VERSION = 2
KINDS: dict[type, str] = {Sandbox: "sandboxes", Container: "containers", Image: "images"}

T = TypeVar("T", Sandbox, Container, Image)


class StoreError(RuntimeError):
    pass


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The database holds the node's records of pods and cells: owner only.
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        os.close(fd)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # Deleted and overwritten rows are zeroed, not left in free pages: the credentials
        # that schema 1 kept on image records do not outlive their rewrite.
        self._db.execute("PRAGMA secure_delete=ON")
        self._migrate()

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"state database has schema {version}, newer than this kiyot-py ({SCHEMA_VERSION})"
            )
        if version == SCHEMA_VERSION:
            return
        with self._db:
            self._db.execute("BEGIN")
            for table in KINDS.values():
                self._db.execute(f"CREATE TABLE IF NOT EXISTS {table} (id TEXT PRIMARY KEY, data TEXT NOT NULL)")
            if version == 1:
                for image_id, data in self._db.execute("SELECT id, data FROM images").fetchall():
                    doc = json.loads(data)
                    if doc.pop("auth", None) is not None:
                        self._db.execute("UPDATE images SET data = ? WHERE id = ?", (json.dumps(doc), image_id))
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def load(self, cls: type[T]) -> list[T]:
        rows = self._db.execute(f"SELECT data FROM {KINDS[cls]}").fetchall()  # noqa: S608 - table from fixed KINDS
        return [from_json(cls, json.loads(data)) for (data,) in rows]

    def put_all(self, records: list[Any]) -> None:
        """Several records in one transaction: all of them land, or none."""
        with self._db:
            self._db.execute("BEGIN")
            for record in records:
                self.put(record)

    def put(self, record: Any) -> None:
        table = KINDS[type(record)]
        self._db.execute(
            f"INSERT INTO {table} (id, data) VALUES (?, ?) "  # noqa: S608 - table from fixed KINDS, values bound
            "ON CONFLICT(id) DO UPDATE SET data=excluded.data",
            (record.id, json.dumps(to_json(record), separators=(",", ":"))),
        )

    def delete(self, cls: type, record_id: str) -> None:
        self._db.execute(f"DELETE FROM {KINDS[cls]} WHERE id=?", (record_id,))  # noqa: S608 - table from fixed KINDS

    def close(self) -> None:
        self._db.close()
