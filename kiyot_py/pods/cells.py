"""A sandbox's cell: what to ask the provider for, bringing it up, and talking to its agent.

Bringing a cell up is three waits, each of its own: the provider accepts the launch
(`launch`, idempotent by a token derived from the pod), the provider says it runs
(`wait_running`, tens of seconds for a VM), its agent answers (polled here). Then the
node learns the cell's facts, from which every container spec is built. With warm pools
(pool.py), a sandbox first claims a standby cell that has been through all of it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog

from kiyot_py.agent_client import AgentClient, AgentError, AgentUnreachable
from kiyot_py.config import Settings
from kiyot_py.crashpoints import crash_point
from kiyot_py.errors import DeadlineExceeded, FailedPrecondition, KiyotError
from kiyot_py.gen.runtime.v1 import api_pb2
from kiyot_py.model import Cell, CellFacts, Sandbox, from_json
from kiyot_py.providers.base import (
    POD_LABEL_TAG_PREFIX,
    ROLE_POD,
    TAG_NODE,
    TAG_POD,
    TAG_POD_ATTEMPT,
    TAG_POD_UID,
    TAG_POOL,
    TAG_ROLE,
    TAG_SANDBOX,
    CellNotFound,
    CellShape,
    Provider,
)
from kiyot_py.registry.pullpath import PullGrants

if TYPE_CHECKING:
    from kiyot_py.pods.pool import WarmPools

log = structlog.get_logger("kiyot.pods.cells")

CLAIM_HEALTH_TIMEOUT = 2.0  # seconds a claimed standby cell's agent has to answer

# Makes the agent client for a cell; tests give a fake agent here.
AgentFactory = Callable[[Cell], AgentClient]
# Gives a cell that made its own key the node's certificate for it, if the key is the one
# its console shows (the second argument reads the fingerprint there): kiyot_py.enrollment.enroll.
Enroller = Callable[[Cell, Callable[[], Awaitable[str]]], Awaitable[None]]


def launch_token(node_name: str, pod_uid: str, attempt: int) -> str:
    """The idempotency token of a sandbox's launch.

    The sandbox id is new on every RunPodSandbox call, but a kubelet's retry carries the
    same pod uid and attempt: the same token finds the same cell, also after a restart.
    32 hex characters: within EC2's 64-character client token."""
    return hashlib.sha256(f"{node_name}/{pod_uid}/{attempt}".encode()).hexdigest()[:32]


def pod_resources(config: api_pb2.PodSandboxConfig) -> tuple[int, int]:
    """(CPU in millicores, memory in bytes) the pod asks for: the kubelet's pod-level
    resources (the sum of its containers' limits) plus the runtime class's overhead;
    0 where it names none (the provider then picks its smallest cell)."""
    if not config.HasField("linux"):
        return 0, 0
    cpu = memory = 0
    for r in (config.linux.resources, config.linux.overhead):
        # The larger of the request (shares) and the limit (quota per period): a pod may
        # burst to its limit, and is owed at least its request. Rounded up.
        limit = -(-r.cpu_quota * 1000 // r.cpu_period) if r.cpu_quota > 0 and r.cpu_period > 0 else 0
        request = -(-r.cpu_shares * 1000 // 1024) if r.cpu_shares > 2 else 0  # 2: the kubelet's "none"
        cpu += max(limit, request)
        memory += max(r.memory_limit_in_bytes, 0)
    return cpu, memory


class Cells:
    def __init__(self, settings: Settings, provider: Provider, agents: AgentFactory,
                 grants: PullGrants | None = None, enroll: Enroller | None = None) -> None:
        self._settings = settings
        self.provider = provider
        self._agents = agents
        self._enroll = enroll
        self.grants = grants if grants is not None else PullGrants()  # what each cell may fetch
        self.pools: WarmPools | None = None  # set by the runtime when pools are configured

    async def terminate(self, cell_id: str) -> None:
        """Take the cell down (idempotent), and with it what it may fetch from the node."""
        self.grants.revoke(cell_id)
        crash_point("cell-terminating")
        await self.provider.terminate(cell_id)

    def agent(self, sb: Sandbox) -> AgentClient:
        assert sb.cell is not None
        return self._agents(sb.cell)

    def refuse_node_access(self, what: str, security: api_pb2.LinuxSandboxSecurityContext
                           | api_pb2.LinuxContainerSecurityContext) -> None:
        """A privileged container is root on its cell's kernel: the node's own, unless the
        cell is a VM of its own. Refused unless the provider allows it (local.allow_privileged).
        (hostPID, hostIPC and hostNetwork mean the cell's namespaces, never the node's.)"""
        if self.provider.features.privileged or not security.privileged:
            return
        raise FailedPrecondition(
            f"{what} asks to be privileged (it would be root on the node's kernel), and this "
            "provider's cells share the node's kernel: refused "
            "(set local.allow_privileged = true to allow it on a node that runs trusted pods only)")

    def shape(self, sb: Sandbox) -> CellShape:
        tags = {f"{POD_LABEL_TAG_PREFIX}{k}": v for k, v in sb.labels.items()}
        tags.update({
            TAG_NODE: self._settings.node_name,
            TAG_SANDBOX: sb.id,
            TAG_POD: f"{sb.namespace}/{sb.name}",
            TAG_ROLE: ROLE_POD,
            TAG_POD_UID: sb.uid,
            TAG_POD_ATTEMPT: str(sb.attempt),
        })
        cpu_millis, memory_bytes = pod_resources(api_pb2.PodSandboxConfig.FromString(sb.config))
        return CellShape(cpu_millis=cpu_millis, memory_bytes=memory_bytes,
                         runtime_handler=sb.runtime_handler, tags=tags, annotations=dict(sb.annotations))

    async def launch(self, sb: Sandbox, save: Callable[[Sandbox], None]) -> AgentClient:
        """Bring the sandbox's cell up until its agent answers and its facts are known: a
        warm pool's standby cell when one fits (up already), else a cell of its own."""
        shape = self.shape(sb)
        agent = await self._claim(sb, shape, save)
        if agent is not None:
            return agent
        if sb.cell is None or TAG_POOL not in sb.cell.tags:  # not a claim resumed after a restart
            sb.cell = await self.provider.launch(shape, sb.launch_token)
            save(sb)  # the cell is recorded before the long waits: a restart finds it

        def record(cell: Cell) -> None:
            sb.cell = cell
            save(sb)

        await self.bring_up(sb.cell, record)
        return self.agent(sb)

    async def bring_up(self, cell: Cell, record: Callable[[Cell], None]) -> Cell:
        """Wait until a launched cell runs, is enrolled and its agent answers, then learn
        its facts; `record` is given the cell each time more of it is known."""
        # One deadline for the whole start (running, enrolled, its agent answering), so that
        # RunPodSandbox answers within the kubelet's runtime request timeout (2 minutes).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.cell_boot_timeout
        cell = await self.provider.wait_running(cell.id, max(0.0, deadline - loop.time()))
        record(cell)
        if cell.enrollment == "console":
            await self._enroll_cell(cell, deadline)
        agent = self._agents(cell)
        await self._wait_for_agent(agent, deadline)
        crash_point("cell-agent-answering")
        cell.facts = from_json(CellFacts, await agent.facts())
        log.info("cell facts", cell=cell.id, sandbox=cell.sandbox_id, architecture=cell.facts.architecture,
                 kernel=cell.facts.kernel)
        record(cell)
        return cell

    async def _claim(self, sb: Sandbox, shape: CellShape, save: Callable[[Sandbox], None]) -> AgentClient | None:
        """The agent of a standby cell claimed for the sandbox, or None: launch one.

        The claim is saved on the sandbox before the cell is retagged as the pod's: after a
        kill -9 between the two, the record owns the cell, the pool never hands it out
        again, and the adopted sandbox's launch takes it over here (and then through the
        whole bring-up, as nothing of it is known after a restart)."""
        claimed_now = False
        if sb.cell is None and self.pools is not None:
            # At most half the start's deadline waiting for a standby cell still coming up:
            # the other half is a launch's, should that one fail.
            cell = await self.pools.claim(shape, self._settings.cell_boot_timeout / 2)
            if cell is None:
                return None
            sb.cell, claimed_now = cell, True
            save(sb)
            crash_point("pool-claim-recorded")
        if sb.cell is None or TAG_POOL not in sb.cell.tags:
            return None
        cell = sb.cell
        try:
            await self.provider.retag(cell.id, shape.tags)
            cell.tags.update(shape.tags)
            cell.sandbox_id = sb.id
            save(sb)
            crash_point("pool-cell-retagged")
            if not claimed_now:
                return None
            agent = self.agent(sb)
            await agent.health(timeout=CLAIM_HEALTH_TIMEOUT)  # waiting for a pod, it may have died
        except (CellNotFound, AgentError) as exc:
            log.warning("a standby cell failed its claim: launching one for the pod", sandbox=sb.id,
                        cell=cell.id, error=str(exc))
            try:
                await self.terminate(cell.id)
            except KiyotError as cleanup:  # still tagged as the pod's: the orphan collector's then
                log.warning("terminating a failed standby cell failed", cell=cell.id, error=str(cleanup))
            sb.cell = None
            save(sb)
            return None
        log.info("standby cell claimed", sandbox=sb.id, cell=cell.id, pool=cell.tags.get(TAG_POOL, ""))
        return agent

    async def learn_facts(self, sb: Sandbox, agent: AgentClient) -> CellFacts:
        assert sb.cell is not None
        if sb.cell.facts is None:
            sb.cell.facts = from_json(CellFacts, await agent.facts())
        return sb.cell.facts

    async def _enroll_cell(self, cell: Cell, deadline: float) -> None:
        """A cell that made its own key: enroll that key, once the cell's console shows it
        and its agent listens (both by the start's deadline)."""
        if self._enroll is None:
            raise FailedPrecondition(f"cell {cell.id} needs enrolling, and this node cannot enroll cells")
        timeout = self._settings.cell_boot_timeout
        loop = asyncio.get_running_loop()

        async def console() -> str:
            return await self.provider.identity_fingerprint(cell.id, max(1.0, deadline - loop.time()))

        delay = 0.05
        while True:
            try:
                await self._enroll(cell, console)
                log.info("cell enrolled", cell=cell.id)
                return
            except AgentUnreachable as exc:  # its agent is not listening yet
                if loop.time() > deadline:
                    raise DeadlineExceeded(f"the cell's agent did not answer within {timeout:.0f}s: "
                                           f"{exc.message}") from None
            await asyncio.sleep(delay)
            delay = min(delay * 1.2, 0.25)

    async def _wait_for_agent(self, agent: AgentClient, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        delay = 0.01
        while True:
            try:
                await agent.health(timeout=2.0)
                return
            except AgentError as exc:
                if loop.time() > deadline:
                    raise DeadlineExceeded(
                        f"the cell's agent did not answer within {self._settings.cell_boot_timeout:.0f}s: "
                        f"{exc.message}") from None
            await asyncio.sleep(delay)
            # Every 10 ms for the first seconds (a local cell answers within a few hundred
            # ms, and a refused connection costs next to nothing), gentler after that.
            if loop.time() - started > 2.0:
                delay = min(delay * 1.5, 0.25)
