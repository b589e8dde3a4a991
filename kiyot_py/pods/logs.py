"""Ship a container's log from its cell to the kubelet's log file on the node.

The agent serves conmon's CRI-format log by byte offset. We copy whole lines only, and
remember (offset in the cell's log, node file inode, node file size) after each copy. A
restart resumes at exactly the next byte: if the node file grew past the recorded size
(a copy landed but its progress was not saved yet), those bytes are skipped, not copied
twice.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from kiyot_py.agent_client import AgentClient, AgentError, AgentLogGone, AgentNotFound
from kiyot_py.model import Container

log = structlog.get_logger("kiyot.pods.logs")

SAVE_EVERY = 1.0  # seconds between progress saves while a log is busy


class LogShipper:
    def __init__(
        self, container: Container, agent: AgentClient, save: Callable[[Container], None]
    ) -> None:
        self._c = container
        self._agent = agent
        self._save = save
        self._file: int | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._last_save = 0.0

    def start(self) -> None:
        # The file exists once StartContainer returns, as with containerd: a reader that
        # opens it at once (critest does) must find it, even before the first line.
        self._open(resume=True)
        self._task = asyncio.create_task(self._run(), name=f"logs-{self._c.id[:12]}")

    async def wait(self, timeout: float) -> None:
        """Wait (bounded) for the log to be copied to its end."""
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=timeout)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        async with self._lock:
            self._close()

    async def reopen(self) -> None:
        """ReopenContainerLog: the kubelet renamed the file; start a new one at the path."""
        async with self._lock:
            self._close()
            self._open(resume=False)
            self._record_progress(force=True)

    def _open(self, resume: bool) -> None:
        path = Path(self._c.log_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        st = os.fstat(self._file)
        if resume and st.st_ino == self._c.log_inode and st.st_size > self._c.log_size:
            self._c.log_offset += st.st_size - self._c.log_size
        self._c.log_inode, self._c.log_size = st.st_ino, st.st_size

    def _close(self) -> None:
        if self._file is not None:
            os.close(self._file)
            self._file = None

    def _record_progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_save >= SAVE_EVERY:
            self._last_save = now
            self._save(self._c)

    async def _write(self, data: bytes) -> None:
        async with self._lock:
            if self._file is None:
                self._open(resume=False)
            assert self._file is not None
            os.write(self._file, data)
            self._c.log_offset += len(data)
            self._c.log_size = os.fstat(self._file).st_size
            self._record_progress()

    async def _run(self) -> None:
        c = self._c
        backoff = 0.1
        try:
            while True:
                pending = b""
                try:
                    async for at, chunk in self._agent.logs(c.id, c.log_offset, follow=True):
                        if at > c.log_offset + len(pending):
                            # Only at a stream's start: the cell cut these bytes off its
                            # log while we could not read them (cells keep two segments).
                            log.warning("log bytes lost in the cell", container=c.id,
                                        lost=at - c.log_offset)
                            c.log_offset = at
                        pending += chunk
                        cut = pending.rfind(b"\n") + 1
                        if cut:
                            await self._write(pending[:cut])
                            pending = pending[cut:]
                            backoff = 0.1
                    if pending:
                        await self._write(pending)
                    c.log_done = True  # the agent ends a followed log only at its end
                    return
                except (AgentNotFound, AgentLogGone) as exc:
                    log.warning("log no longer available", container=c.id, error=exc.message)
                    c.log_done = True
                    return
                except AgentError as exc:
                    log.debug("log stream broke; resuming", container=c.id, error=exc.message)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        finally:
            self._record_progress(force=True)
