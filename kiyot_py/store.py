"""Persistent state: SQLite in WAL mode, one table per kind of record.

Records are small JSON documents keyed by id. Everything is also held in memory by
`kiyot_py.pods`, so reads here happen only at start-up; writes are synchronous and
short (a commit in WAL mode is well under a millisecond), which keeps the state on
disk in step with what the kubelet was told.

A sandbox's cell facts (about 13 KB with the cell's seccomp profile) are learned once
and never change, while the sandbox is saved at every step of its life: they live in a
table of their own (`cell_facts`, by sandbox id), written when they are new, so that a
save of the sandbox writes only the rest of it (a few hundred bytes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
from pathlib import Path
from typing import Any, TypeVar

from kiyot_py.model import CellFacts, Container, Image, Sandbox, from_json, to_json

# 1: the tables. 2: image records keep no credentials (version 1 kept the last pull's).
# 3: cell facts apart from the sandboxes (cell_facts).
SCHEMA_VERSION = 3
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
        # The facts object last written per sandbox: facts are replaced, never changed in place.
        self._facts_written: dict[str, CellFacts] = {}
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
            for table in (*KINDS.values(), "cell_facts"):
                self._db.execute(f"CREATE TABLE IF NOT EXISTS {table} (id TEXT PRIMARY KEY, data TEXT NOT NULL)")
            if 0 < version < 3:
                for sandbox_id, data in self._db.execute("SELECT id, data FROM sandboxes").fetchall():
                    doc = json.loads(data)
                    facts = (doc.get("cell") or {}).pop("facts", None)
                    if facts is not None:
                        self._db.execute("INSERT OR REPLACE INTO cell_facts (id, data) VALUES (?, ?)",
                                         (sandbox_id, json.dumps(facts)))
                        self._db.execute("UPDATE sandboxes SET data = ? WHERE id = ?", (json.dumps(doc), sandbox_id))
            if version == 1:
                for image_id, data in self._db.execute("SELECT id, data FROM images").fetchall():
                    doc = json.loads(data)
                    if doc.pop("auth", None) is not None:
                        self._db.execute("UPDATE images SET data = ? WHERE id = ?", (json.dumps(doc), image_id))
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def load(self, cls: type[T]) -> list[T]:
        rows = self._db.execute(f"SELECT data FROM {KINDS[cls]}").fetchall()  # noqa: S608 - table from fixed KINDS
        records = [from_json(cls, json.loads(data)) for (data,) in rows]
        if cls is Sandbox:
            facts = dict(self._db.execute("SELECT id, data FROM cell_facts").fetchall())
            for sb in records:
                assert isinstance(sb, Sandbox)
                if sb.cell is not None and sb.id in facts:
                    sb.cell.facts = from_json(CellFacts, json.loads(facts[sb.id]))
                    self._facts_written[sb.id] = sb.cell.facts
        return records

    def put_all(self, records: list[Any]) -> None:
        """Several records in one transaction: all of them land, or none."""
        with self._db:
            self._db.execute("BEGIN")
            for record in records:
                self.put(record)

    def put(self, record: Any) -> None:
        table = KINDS[type(record)]
        if isinstance(record, Sandbox) and record.cell is not None and record.cell.facts is not None:
            facts = record.cell.facts
            if self._facts_written.get(record.id) is not facts:
                self._db.execute("INSERT INTO cell_facts (id, data) VALUES (?, ?) "
                                 "ON CONFLICT(id) DO UPDATE SET data=excluded.data",
                                 (record.id, json.dumps(to_json(facts), separators=(",", ":"))))
                self._facts_written[record.id] = facts
            # The rest of the sandbox; its facts are in their own row (shallow copies, cheap).
            record = dataclasses.replace(record, cell=dataclasses.replace(record.cell, facts=None))
        self._db.execute(
            f"INSERT INTO {table} (id, data) VALUES (?, ?) "  # noqa: S608 - table from fixed KINDS, values bound
            "ON CONFLICT(id) DO UPDATE SET data=excluded.data",
            (record.id, json.dumps(to_json(record), separators=(",", ":"))),
        )

    def delete(self, cls: type, record_id: str) -> None:
        if cls is not Sandbox:
            self._db.execute(f"DELETE FROM {KINDS[cls]} WHERE id=?", (record_id,))  # noqa: S608 - fixed KINDS
            return
        with self._db:  # the sandbox and its facts together
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM sandboxes WHERE id=?", (record_id,))
            self._db.execute("DELETE FROM cell_facts WHERE id=?", (record_id,))
        self._facts_written.pop(record_id, None)

    def close(self) -> None:
        self._db.close()
