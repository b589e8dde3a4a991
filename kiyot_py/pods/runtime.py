"""The pod lifecycle: sandboxes become cells, containers run in them.

Every decision lives here. The node's own records (in memory, saved to the store on
every change) answer List and Status; a watcher per cell keeps them fresh from the
agent's event stream; a log shipper per container copies its log to the node.
"""

from __future__ import annotations

import asyncio
import os

import aiohttp
import structlog

from kiyot_py.agent_client import AgentClient, AgentError, ExecResult
from kiyot_py.config import Settings
from kiyot_py.gen.runtime.v1 import api_pb2
from kiyot_py.hostports import HostPort, HostPortError, HostPorts
from kiyot_py.model import (
    CONTAINER_CREATED,
    CONTAINER_EXITED,
    CONTAINER_RUNNING,
    CONTAINER_UNKNOWN,
    SANDBOX_NOTREADY,
    SANDBOX_READY,
    Container,
    Sandbox,
    new_id,
    now_ns,
)
from kiyot_py.pods.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PodError,
    Unavailable,
)
from kiyot_py.pods.images import ImageManager
from kiyot_py.pods.logs import LogShipper
from kiyot_py.pods.oci_spec import SpecError, build_container_spec
from kiyot_py.providers.base import TAG_NODE, TAG_SANDBOX, CellFeatures, Provider
from kiyot_py.store import Store

log = structlog.get_logger("kiyot.pods")

_AGENT_STATES = {
    "created": CONTAINER_CREATED,
    "running": CONTAINER_RUNNING,
    "exited": CONTAINER_EXITED,
    "unknown": CONTAINER_UNKNOWN,
}
# States only move forward; an event that arrives late never undoes a newer one.
_RANK = {CONTAINER_CREATED: 0, CONTAINER_RUNNING: 1, CONTAINER_EXITED: 2, CONTAINER_UNKNOWN: 2}

GC_INTERVAL = 60.0
HOST_NAME_MAX = 64  # bytes; sethostname(2) refuses more
LOG_SETTLE_TIMEOUT = 2.0  # seconds an exit waits for the container's last log bytes


class PodRuntime:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        provider: Provider,
        images: ImageManager,
        http: aiohttp.ClientSession,
    ) -> None:
        self._settings = settings
        self._store = store
        self._provider = provider
        self.images = images
        self._http = http
        self.sandboxes: dict[str, Sandbox] = {s.id: s for s in store.load(Sandbox)}
        self.containers: dict[str, Container] = {c.id: c for c in store.load(Container)}
        self._creating: dict[tuple, asyncio.Task[str]] = {}
        self._reserved_names: set[tuple] = set()
        self._containers_in_flight: set[str] = set()  # asked of an agent, not recorded yet
        self._sandbox_locks: dict[str, asyncio.Lock] = {}
        self._watchers: dict[str, asyncio.Task] = {}
        self._shippers: dict[str, LogShipper] = {}
        self._gc_task: asyncio.Task | None = None
        self._gc_suspects: set[str] = set()
        self._hostports = HostPorts()

    # -- start and stop -------------------------------------------------------------

    async def recover(self) -> None:
        """After a restart (even kill -9): re-attach to every cell the records name."""
        for sb in list(self.sandboxes.values()):
            if sb.phase == "creating":
                # The kubelet never heard of it; drop it, with any cell it got.
                log.info("dropping half-created sandbox", sandbox=sb.id)
                for cell in await self._provider.list_cells({TAG_SANDBOX: sb.id}):
                    await self._provider.delete_cell(cell.id)
                self._forget_sandbox(sb)
                continue
            if sb.state != SANDBOX_READY or sb.cell is None:
                continue
            cell = await self._provider.describe_cell(sb.cell.id)
            if cell is None or cell.state == "terminated":
                log.warning("cell is gone", sandbox=sb.id, cell=sb.cell.id)
                if cell is not None:
                    await self._provider.delete_cell(cell.id)  # release what is left of it
                self._cell_lost(sb)
                continue
            sb.cell = cell
            self._store.put(sb)
            try:
                config = api_pb2.PodSandboxConfig.FromString(sb.config)
                await self._hostports.open(sb.id, cell.address, host_ports(config))
            except (HostPortError, InvalidArgument) as exc:
                log.warning("host ports not reopened", sandbox=sb.id, error=str(exc))
            self._start_watcher(sb)
            for c in self._containers_of(sb.id):
                if c.state != CONTAINER_CREATED and c.log_path and not c.log_done:
                    self._start_shipper(c, sb)
        self._gc_task = asyncio.create_task(self._gc_loop(), name="cell-gc")
        log.info("state recovered", sandboxes=len(self.sandboxes), containers=len(self.containers))

    async def close(self) -> None:
        """Stop watching and shipping; cells and containers keep running."""
        tasks = list(self._watchers.values()) + ([self._gc_task] if self._gc_task else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(s.stop() for s in self._shippers.values()), return_exceptions=True)
        await self._hostports.close_all()

    @property
    def cell_features(self) -> CellFeatures:
        return self._provider.features

    # -- sandboxes ------------------------------------------------------------------

    async def run_sandbox(self, config: api_pb2.PodSandboxConfig, runtime_handler: str) -> str:
        md = config.metadata
        if not md.name or not md.namespace or not md.uid:
            raise InvalidArgument("sandbox metadata needs name, namespace and uid")
        if len(config.hostname.encode()) > HOST_NAME_MAX:
            raise InvalidArgument(
                f"hostname {config.hostname!r} is longer than {HOST_NAME_MAX} bytes")
        ports = host_ports(config)
        if any(p.container_port == self._settings.local.agent_port for p in ports):
            raise InvalidArgument(
                f"container port {self._settings.local.agent_port} is the cell agent's own")
        key = (md.name, md.namespace, md.uid, md.attempt)
        for sb in self.sandboxes.values():
            if sb.key == key and sb.phase != "creating":
                return sb.id  # the kubelet repeated itself: same sandbox, no second cell
        task = self._creating.get(key)
        if task is None:
            # Its own task: a kubelet that gives up waiting must not abort the creation
            # half-way; its retry joins this one instead.
            task = asyncio.create_task(self._create_sandbox(config, runtime_handler))
            self._creating[key] = task
            task.add_done_callback(lambda _: self._creating.pop(key, None))
        return await asyncio.shield(task)

    async def _create_sandbox(self, config: api_pb2.PodSandboxConfig, handler: str) -> str:
        md = config.metadata
        sb = Sandbox(
            id=new_id(), name=md.name, namespace=md.namespace, uid=md.uid, attempt=md.attempt,
            labels=dict(config.labels), annotations=dict(config.annotations),
            runtime_handler=handler, log_directory=config.log_directory,
            config=config.SerializeToString(),
        )
        self.sandboxes[sb.id] = sb
        self._store.put(sb)
        log.info("creating sandbox", sandbox=sb.id, pod=f"{md.namespace}/{md.name}")
        try:
            sb.cell = await self._provider.create_cell(sb.id, self._tags(sb))
            # No host name given (hostNetwork, crictl): the cell's own, as containerd
            # gives the node's. The pod's name would not do: it may exceed 64 bytes.
            sb.hostname = config.hostname or sb.cell.hostname or sb.cell.id
            self._store.put(sb)
            await self._hostports.open(sb.id, sb.cell.address, host_ports(config))
            agent = self._agent(sb)
            await self._wait_for_agent(agent)
            dns = config.dns_config
            await agent.put_pod({
                "sandbox_id": sb.id,
                "hostname": sb.hostname,
                "dns": {"servers": list(dns.servers), "searches": list(dns.searches),
                        "options": list(dns.options)},
                "labels": dict(config.labels),
            })
        except BaseException as exc:
            log.warning("sandbox creation failed", sandbox=sb.id, error=str(exc))
            await self._hostports.close(sb.id)
            if sb.cell is not None:
                await asyncio.shield(self._provider.delete_cell(sb.cell.id))
            self._forget_sandbox(sb)
            if isinstance(exc, AgentError):
                raise _agent_failure(f"setting up the cell of sandbox {sb.id}", exc) from None
            if isinstance(exc, HostPortError):
                raise FailedPrecondition(str(exc)) from None
            raise
        sb.state = SANDBOX_READY
        sb.phase = "ready"
        self._store.put(sb)
        self._start_watcher(sb)
        log.info("sandbox ready", sandbox=sb.id, ip=sb.cell.address)
        return sb.id

    def _tags(self, sb: Sandbox) -> dict[str, str]:
        tags = {f"pod-label:{k}": v for k, v in sb.labels.items()}
        tags.update({
            TAG_NODE: self._settings.node_name,
            TAG_SANDBOX: sb.id,
            "kiyot-pod": f"{sb.namespace}/{sb.name}",
        })
        return tags

    async def _wait_for_agent(self, agent: AgentClient) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        delay = 0.01
        while True:
            try:
                await agent.health(timeout=2.0)
                return
            except AgentError:
                if loop.time() - started > self._settings.cell_boot_timeout:
                    raise
            await asyncio.sleep(delay)
            # Every 10 ms for the first seconds (a local cell answers within a few hundred
            # ms, and a refused connection costs next to nothing), gentler after that.
            if loop.time() - started > 2.0:
                delay = min(delay * 1.5, 0.25)

    async def stop_sandbox(self, sandbox_id: str) -> None:
        sb = self._find_sandbox(sandbox_id)
        if sb is None:
            return  # StopPodSandbox is idempotent
        async with self._sandbox_lock(sb.id):
            if sb.phase == "creating":
                task = self._creating.get(sb.key)
                if task is not None:
                    await asyncio.gather(task, return_exceptions=True)
            await self._hostports.close(sb.id)  # also when the cell was lost meanwhile
            if sb.cell is None or sb.cell.state == "terminated":
                return
            agent = self._agent(sb)
            for c in self._containers_of(sb.id):
                if c.state in (CONTAINER_CREATED, CONTAINER_RUNNING):
                    try:
                        self._apply(c, await agent.stop_container(c.id, 0, "SIGKILL"))
                    except AgentError as exc:
                        log.warning("stopping container failed", container=c.id, error=exc.message)
            # Let the last log lines reach the node before the cell goes away.
            shippers = [self._shippers[c.id] for c in self._containers_of(sb.id) if c.id in self._shippers]
            await asyncio.gather(*(s.wait(5.0) for s in shippers))
            await self._stop_watcher(sb.id)
            await self._provider.delete_cell(sb.cell.id)
            self._cell_lost(sb, reason="SandboxStopped")
            log.info("sandbox stopped", sandbox=sb.id)

    async def remove_sandbox(self, sandbox_id: str) -> None:
        sb = self._find_sandbox(sandbox_id)
        if sb is None:
            return  # RemovePodSandbox is idempotent
        await self.stop_sandbox(sb.id)
        for c in self._containers_of(sb.id):
            await self._forget_container(c)
        self._forget_sandbox(sb)
        log.info("sandbox removed", sandbox=sb.id)

    def sandbox(self, sandbox_id: str) -> Sandbox:
        sb = self._find_sandbox(sandbox_id)
        if sb is None:
            raise NotFound(f"pod sandbox {sandbox_id!r} not found")
        return sb

    def list_sandboxes(
        self, id_prefix: str = "", state: str | None = None, labels: dict[str, str] | None = None
    ) -> list[Sandbox]:
        return [
            sb for sb in self.sandboxes.values()
            if sb.phase != "creating"
            and sb.id.startswith(id_prefix)
            and (state is None or sb.state == state)
            and _labels_match(sb.labels, labels)
        ]

    # -- containers -----------------------------------------------------------------

    async def create_container(
        self,
        sandbox_id: str,
        config: api_pb2.ContainerConfig,
        sandbox_config: api_pb2.PodSandboxConfig,
    ) -> str:
        sb = self.sandbox(sandbox_id)
        if sb.state != SANDBOX_READY or sb.cell is None:
            raise FailedPrecondition(f"pod sandbox {sb.id} is not ready")
        md = config.metadata
        if not md.name:
            raise InvalidArgument("container metadata needs a name")
        name_key = (sb.id, md.name, md.attempt)
        for c in self._containers_of(sb.id):
            if (c.sandbox_id, c.name, c.attempt) == name_key:
                raise AlreadyExists(f"container name {md.name!r} (attempt {md.attempt}) is in use by {c.id}")
        if name_key in self._reserved_names:
            raise AlreadyExists(f"container name {md.name!r} (attempt {md.attempt}) is being created")
        if not config.image.image:
            raise InvalidArgument("container config names no image")
        image = self.images.get(config.image.image)
        if not sandbox_config.HasField("metadata"):
            sandbox_config = api_pb2.PodSandboxConfig.FromString(sb.config)
        try:
            spec = build_container_spec(config, sandbox_config, image.config.get("config") or {},
                                        hostname=sb.hostname or None)
        except SpecError as exc:
            raise InvalidArgument(str(exc)) from None

        container = Container(
            id=new_id(), sandbox_id=sb.id, name=md.name, attempt=md.attempt,
            image=config.image.image, image_id=image.id,
            image_ref=image.repo_digests[0] if image.repo_digests else image.id,
            labels=dict(config.labels), annotations=dict(config.annotations),
            log_path=os.path.join(sb.log_directory, config.log_path)
            if sb.log_directory and config.log_path else "",
            stop_signal=spec.stop_signal, config=config.SerializeToString(),
        )
        agent = self._agent(sb)
        self._reserved_names.add(name_key)
        self._containers_in_flight.add(container.id)
        try:
            await agent.pull(**self.images.cell_pull(image, sb.cell))
            record = await agent.create_container({
                "id": container.id, "name": md.name, "image_digest": image.platform_digest,
                "spec": spec.spec, "user": spec.user, "groups_policy": spec.groups_policy,
                "stop_signal": spec.stop_signal,
                "pod_namespaces": list(spec.pod_namespaces), "pid_target": spec.pid_target,
            })
            self._apply(container, record, save=False)
            self.containers[container.id] = container
            self._store.put(container)
        except AgentError as exc:
            raise _agent_failure(f"creating container {md.name!r}", exc) from None
        finally:
            self._reserved_names.discard(name_key)
            self._containers_in_flight.discard(container.id)
        log.info("container created", container=container.id, sandbox=sb.id, name=md.name)
        return container.id

    async def start_container(self, container_id: str) -> None:
        c = self.container(container_id)
        if c.state == CONTAINER_RUNNING:
            return
        if c.state != CONTAINER_CREATED:
            raise FailedPrecondition(f"container {c.id} is {_state_word(c.state)}, not created")
        sb = self.sandbox(c.sandbox_id)
        try:
            self._apply(c, await self._agent(sb).start_container(c.id))
        except AgentError as exc:
            raise _agent_failure(f"starting container {c.id}", exc) from None
        if c.log_path:
            self._start_shipper(c, sb)
        log.info("container started", container=c.id)

    async def stop_container(self, container_id: str, timeout: int) -> None:
        c = self._find_container(container_id)
        if c is None or c.state in (CONTAINER_EXITED, CONTAINER_UNKNOWN):
            return  # StopContainer is idempotent
        sb = self.sandbox(c.sandbox_id)
        try:
            await self._apply_exit(c, await self._agent(sb).stop_container(c.id, max(timeout, 0), c.stop_signal))
        except AgentError as exc:
            raise _agent_failure(f"stopping container {c.id}", exc) from None
        log.info("container stopped", container=c.id, exit_code=c.exit_code)

    async def remove_container(self, container_id: str) -> None:
        c = self._find_container(container_id)
        if c is None:
            return  # RemoveContainer is idempotent
        sb = self.sandboxes.get(c.sandbox_id)
        if sb is not None and sb.cell is not None and sb.cell.state != "terminated":
            try:
                await self._agent(sb).delete_container(c.id)
            except AgentError as exc:
                raise _agent_failure(f"removing container {c.id}", exc) from None
        await self._forget_container(c)
        log.info("container removed", container=c.id)

    def container(self, container_id: str) -> Container:
        c = self._find_container(container_id)
        if c is None:
            raise NotFound(f"container {container_id!r} not found")
        return c

    def list_containers(
        self,
        id_prefix: str = "",
        sandbox_prefix: str = "",
        state: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> list[Container]:
        return [
            c for c in self.containers.values()
            if c.id.startswith(id_prefix)
            and c.sandbox_id.startswith(sandbox_prefix)
            and (state is None or c.state == state)
            and _labels_match(c.labels, labels)
        ]

    async def reopen_log(self, container_id: str) -> None:
        c = self.container(container_id)
        if c.state != CONTAINER_RUNNING:
            raise FailedPrecondition(f"container {c.id} is not running")
        shipper = self._shippers.get(c.id)
        if shipper is not None:
            await shipper.reopen()

    async def exec_sync(self, container_id: str, cmd: list[str], timeout: int) -> ExecResult:
        c = self.container(container_id)
        if c.state != CONTAINER_RUNNING:
            raise FailedPrecondition(f"container {c.id} is not running")
        if not cmd:
            raise InvalidArgument("exec needs a command")
        try:
            return await self._agent(self.sandbox(c.sandbox_id)).exec_sync(c.id, cmd, timeout)
        except AgentError as exc:
            if exc.status == 504:
                raise DeadlineExceeded(f"command {cmd!r} timed out after {timeout}s; it was killed") from None
            raise _agent_failure(f"exec in container {c.id}", exc) from None

    # -- images in the cells ----------------------------------------------------------

    async def remove_image(self, image: str) -> None:
        """Forget the image on the node, and free it in every cell where no container uses it."""
        record = self.images.find(image)
        if record is None:
            return  # RemoveImage is idempotent
        self.images.remove(image)
        users = {c.sandbox_id for c in self.containers.values() if c.image_id == record.id}
        cells = [sb for sb in self._ready_sandboxes() if sb.id not in users]
        results = await asyncio.gather(
            *(self._agent(sb).remove_image(record.platform_digest) for sb in cells), return_exceptions=True)
        for sb, result in zip(cells, results, strict=True):
            if isinstance(result, AgentError):
                log.warning("freeing an image in a cell failed", sandbox=sb.id, error=result.message)

    async def image_usage(self) -> dict[str, dict[str, int]]:
        """What images and containers' writable layers take in the cells, summed:
        {"images": {"bytes", "inodes"}, "containers": {...}}. A cell that does not answer
        counts as nothing (it is being torn down or is lost; its watcher will tell)."""
        sandboxes = self._ready_sandboxes()
        answers = await asyncio.gather(*(self._agent(sb).usage() for sb in sandboxes), return_exceptions=True)
        total = {kind: {"bytes": 0, "inodes": 0} for kind in ("images", "containers")}
        for answer in answers:
            if isinstance(answer, dict):
                for kind, counts in total.items():
                    for key in counts:
                        counts[key] += int((answer.get(kind) or {}).get(key) or 0)
        return total

    def _ready_sandboxes(self) -> list[Sandbox]:
        return [sb for sb in self.sandboxes.values()
                if sb.state == SANDBOX_READY and sb.cell is not None and sb.cell.state != "terminated"]

    # -- watching cells -------------------------------------------------------------

    def _start_watcher(self, sb: Sandbox) -> None:
        self._watchers[sb.id] = asyncio.create_task(self._watch(sb), name=f"watch-{sb.id[:12]}")

    async def _stop_watcher(self, sandbox_id: str) -> None:
        task = self._watchers.pop(sandbox_id, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _watch(self, sb: Sandbox) -> None:
        agent = self._agent(sb)
        delay = 0.1
        while True:
            try:
                async for event in agent.events():
                    delay = 0.1
                    if event.get("type") == "snapshot":
                        records = event.get("containers", [])
                        await self._remove_strays(sb, agent, records)
                    elif event.get("type") == "container":
                        records = [event["container"]]
                    else:
                        continue
                    for record in records:
                        c = self.containers.get(record.get("id", ""))
                        if c is not None:
                            await self._apply_exit(c, record)
            except AgentError as exc:
                log.debug("event stream broke; reconnecting", sandbox=sb.id, error=exc.message)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _remove_strays(self, sb: Sandbox, agent: AgentClient, records: list[dict]) -> None:
        """Containers a cell holds that the node never recorded (a crash cut a create short).

        The kubelet never heard of them and makes its own again, so they would only run on
        unseen; every snapshot (each time the watcher connects) clears them.
        """
        for record in records:
            cid = record.get("id", "")
            if cid and cid not in self.containers and cid not in self._containers_in_flight:
                log.info("removing a container the node never recorded", sandbox=sb.id, container=cid)
                try:
                    await agent.delete_container(cid)
                except AgentError as exc:
                    log.warning("removing stray container failed", container=cid, error=exc.message)

    async def _apply_exit(self, c: Container, record: dict) -> None:
        """Apply a record; an exit only once its log is on the node (bounded wait).

        A reader that sees the container exited reads its log file next, as the kubelet
        and critest do: with containerd the last line is there by then, so here too."""
        shipper = self._shippers.get(c.id)
        if shipper is not None and record.get("state") in ("exited", "unknown") and c.state != CONTAINER_EXITED:
            await shipper.wait(LOG_SETTLE_TIMEOUT)
        self._apply(c, record)

    def _apply(self, c: Container, record: dict, save: bool = True) -> None:
        state = _AGENT_STATES.get(record.get("state", ""), CONTAINER_UNKNOWN)
        if _RANK[state] < _RANK[c.state]:
            return
        before = (c.state, c.pid, c.exit_code, c.reason, c.started_at, c.finished_at)
        c.state = state
        c.pid = int(record.get("pid") or 0)
        c.exit_code = int(record.get("exit_code") or 0)
        c.reason = record.get("reason") or ""
        c.message = record.get("message") or ""
        c.started_at = int(record.get("started_at") or 0)
        c.finished_at = int(record.get("finished_at") or 0)
        user = record.get("user") or {}
        if user:
            c.uid, c.gid, c.groups = int(user["uid"]), int(user["gid"]), [int(g) for g in user["groups"]]
        if save and before != (c.state, c.pid, c.exit_code, c.reason, c.started_at, c.finished_at):
            self._store.put(c)

    def _start_shipper(self, c: Container, sb: Sandbox) -> None:
        if c.id not in self._shippers:
            shipper = LogShipper(c, self._agent(sb), self._save_if_known)
            self._shippers[c.id] = shipper
            shipper.start()

    def _save_if_known(self, c: Container) -> None:
        if c.id in self.containers:
            self._store.put(c)

    # -- garbage collection -----------------------------------------------------------

    async def _gc_loop(self) -> None:
        while True:
            try:
                await self.collect_orphan_cells()
            except Exception:
                log.exception("cell garbage collection failed")
            await asyncio.sleep(GC_INTERVAL)

    async def collect_orphan_cells(self) -> None:
        """Delete cells of this node that no sandbox owns, seen so on two passes in a row."""
        owned = {sb.cell.id for sb in self.sandboxes.values() if sb.cell is not None}
        creating = {sb.id for sb in self.sandboxes.values() if sb.phase == "creating"}
        orphans = {
            cell.id for cell in await self._provider.list_cells({TAG_NODE: self._settings.node_name})
            if cell.id not in owned and cell.sandbox_id not in creating
        }
        for cell_id in orphans & self._gc_suspects:
            log.info("deleting orphan cell", cell=cell_id)
            await self._provider.delete_cell(cell_id)
        self._gc_suspects = orphans - self._gc_suspects

    # -- helpers --------------------------------------------------------------------

    def _agent(self, sb: Sandbox) -> AgentClient:
        assert sb.cell is not None
        return AgentClient(self._http, sb.cell.agent_url, sb.cell.token)

    def _sandbox_lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._sandbox_locks.setdefault(sandbox_id, asyncio.Lock())

    def _find_sandbox(self, sandbox_id: str) -> Sandbox | None:
        return _find(self.sandboxes, sandbox_id)

    def _find_container(self, container_id: str) -> Container | None:
        return _find(self.containers, container_id)

    def _containers_of(self, sandbox_id: str) -> list[Container]:
        return [c for c in self.containers.values() if c.sandbox_id == sandbox_id]

    def _cell_lost(self, sb: Sandbox, reason: str = "CellLost") -> None:
        """The cell is gone: its sandbox is not ready and nothing in it runs any more."""
        for c in self._containers_of(sb.id):
            if c.state in (CONTAINER_CREATED, CONTAINER_RUNNING):
                c.state = CONTAINER_EXITED if reason == "SandboxStopped" else CONTAINER_UNKNOWN
                c.finished_at = c.finished_at or now_ns()
                c.exit_code = c.exit_code or 137
                c.reason = reason
                self._store.put(c)
        sb.state = SANDBOX_NOTREADY
        if sb.cell is not None:
            sb.cell.state = "terminated"
        self._store.put(sb)

    def _forget_sandbox(self, sb: Sandbox) -> None:
        self.sandboxes.pop(sb.id, None)
        self._sandbox_locks.pop(sb.id, None)
        self._store.delete(Sandbox, sb.id)

    async def _forget_container(self, c: Container) -> None:
        shipper = self._shippers.pop(c.id, None)
        if shipper is not None:
            await shipper.stop()
        self.containers.pop(c.id, None)
        self._store.delete(Container, c.id)


_PROTOCOLS = {api_pb2.TCP: "tcp", api_pb2.UDP: "udp"}


def host_ports(config: api_pb2.PodSandboxConfig) -> list[HostPort]:
    """The sandbox's port mappings that ask for a port on the node (host_port > 0)."""
    ports = []
    for m in config.port_mappings:
        if m.host_port <= 0:
            continue  # only a container port: the pod IP serves it as it is
        if m.host_port > 65535 or not 0 < m.container_port <= 65535:
            raise InvalidArgument(f"port mapping {m.host_port}->{m.container_port} is out of range")
        protocol = _PROTOCOLS.get(m.protocol)
        if protocol is None:
            raise InvalidArgument(
                f"host port {m.host_port}: protocol {api_pb2.Protocol.Name(m.protocol)} is not supported")
        port = HostPort(protocol, m.host_ip, m.host_port, m.container_port)
        if any((p.protocol, p.host_ip, p.host_port) == (protocol, m.host_ip, m.host_port) for p in ports):
            raise InvalidArgument(f"host port {port} is mapped twice")
        ports.append(port)
    return ports


def _find(records: dict, wanted: str):
    """Exact id, or a prefix that names exactly one record (as crictl allows)."""
    if not wanted:
        return None
    if wanted in records:
        return records[wanted]
    matches = [r for key, r in records.items() if key.startswith(wanted)]
    return matches[0] if len(matches) == 1 else None


def _labels_match(labels: dict[str, str], selector: dict[str, str] | None) -> bool:
    return not selector or all(labels.get(k) == v for k, v in selector.items())


def _state_word(state: str) -> str:
    return state.removeprefix("CONTAINER_").lower()


def _agent_failure(what: str, exc: AgentError) -> PodError:
    if exc.status == 404:
        return NotFound(f"{what}: {exc.message}")
    if exc.status == 409:
        return FailedPrecondition(f"{what}: {exc.message}")
    if exc.status == 400:
        return InvalidArgument(f"{what}: {exc.message}")
    return Unavailable(f"{what}: {exc.message}")
