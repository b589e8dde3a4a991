"""Container records: the agent's memory, kept on disk so a restart loses nothing.

Each record is one JSON file written atomically (tmp + fsync + rename + fsync dir), so a
`kill -9` at any moment leaves either the old or the new record, never half of one.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CREATED = "created"
RUNNING = "running"
EXITED = "exited"
UNKNOWN = "unknown"
LIVE_STATES = (CREATED, RUNNING)


def now_ns() -> int:
    return time.time_ns()


@dataclass
class ContainerRecord:
    id: str
    name: str
    image_digest: str
    state: str = CREATED
    pid: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    created_at: int = 0
    started_at: int = 0
    finished_at: int = 0
    log_size: int = 0
    # The identity the container's process runs with: uid, gid, and every group it holds
    # (the primary one included), as ContainerStatus reports it.
    user: dict[str, Any] = field(default_factory=dict)
    # The limits in force (an OCI linux.resources' cpu, memory, pids): create's, then each
    # update's over them (resources.py), so the node reads back what its cgroup holds.
    resources: dict[str, Any] = field(default_factory=dict)
    # Private: never sent to the node.
    request_hash: str = ""
    stop_signal: str = "SIGTERM"
    conmon_pid: int = 0
    # The CRI config's stdio, for attach: conmon holds a stdin (closed after the first
    # attach when stdin_once), and the container has a console of its own (tty).
    stdin: bool = False
    stdin_once: bool = False
    tty: bool = False
    # Log offsets are logical (bytes since the container began): the current log file
    # starts at log_base, the previous one (ctr.log.1, if any) at log_prev_base.
    log_base: int = 0
    log_prev_base: int = 0

    PUBLIC = (
        "id", "name", "image_digest", "state", "pid", "exit_code", "reason", "message",
        "created_at", "started_at", "finished_at", "log_size", "user", "resources",
    )

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: d[k] for k in self.PUBLIC}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ContainerRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    # A temporary name of this thread's own: saves of one record may run in two threads.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)  # the rename itself must survive a crash
    finally:
        os.close(dfd)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, sort_keys=True).encode())


@dataclass
class RecordStore:
    """Records live next to the container's files: <containers>/<id>/record.json."""

    root: Path
    _cache: dict[str, ContainerRecord] = field(default_factory=dict)

    def path(self, cid: str) -> Path:
        return self.root / cid / "record.json"

    def save(self, rec: ContainerRecord) -> None:
        self.path(rec.id).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path(rec.id), asdict(rec))
        self._cache[rec.id] = rec

    def get(self, cid: str) -> ContainerRecord | None:
        return self._cache.get(cid)

    def all(self) -> list[ContainerRecord]:
        return sorted(self._cache.values(), key=lambda r: r.created_at)

    def forget(self, cid: str) -> None:
        self._cache.pop(cid, None)

    def load(self) -> tuple[list[ContainerRecord], list[Path]]:
        """Reload every record; also return container dirs that have none (a create cut short)."""
        self.root.mkdir(parents=True, exist_ok=True)
        orphans: list[Path] = []
        for d in sorted(self.root.iterdir()):
            if not d.is_dir():
                continue
            p = d / "record.json"
            if not p.exists():
                orphans.append(d)
                continue
            try:
                rec = ContainerRecord.from_dict(json.loads(p.read_text()))
            except (ValueError, TypeError):
                orphans.append(d)
                continue
            self._cache[rec.id] = rec
        return self.all(), orphans
