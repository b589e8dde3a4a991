"""The pod lifecycle, wired: one module per job over one index.

| verb(s) | decided in |
|---|---|
| RunPodSandbox, StopPodSandbox, RemovePodSandbox, PodSandboxStatus, ListPodSandbox | `sandboxes.py` |
| Create/Start/Stop/RemoveContainer, ContainerStatus, ListContainers, ReopenContainerLog, ExecSync | `containers.py` |
| PullImage, ImageStatus, ListImages | `images.py` |
| RemoveImage, ImageFsInfo (and an image into a cell, for CreateContainer) | `cell_images.py` |
| (List)ContainerStats, (List)PodSandboxStats, ListPodSandboxMetrics (and their streams) | `stats.py` |

Beside them: `cells.py` (bringing a cell up, its agent), `sync.py` (watchers, log
shippers), `recovery.py` (after a restart), `cellwatch.py` (cells that went away: spot
interruptions, instances terminated or stopped), `gc.py` (orphan cells), `pool.py` (warm
pools of standby cells), `index.py` (the records). The provider and the agent client are
injected: tests give fakes.
"""

from __future__ import annotations

import structlog

from kiyot_py.config import Settings
from kiyot_py.errors import KiyotError
from kiyot_py.gen.runtime.v1 import api_pb2
from kiyot_py.hostports import HostPorts
from kiyot_py.model import SANDBOX_READY, Cell, CellFacts, Credentials, Image, Sandbox
from kiyot_py.pods.cell_images import CellImages
from kiyot_py.pods.cells import AgentFactory, Cells, Enroller
from kiyot_py.pods.cellwatch import CellWatch
from kiyot_py.pods.containers import Containers
from kiyot_py.pods.gc import OrphanCollector
from kiyot_py.pods.images import ImageManager
from kiyot_py.pods.index import Index
from kiyot_py.pods.pool import WarmPools
from kiyot_py.pods.recovery import recover
from kiyot_py.pods.sandboxes import Sandboxes
from kiyot_py.pods.shared_images import SharedImages
from kiyot_py.pods.stats import StatsCache
from kiyot_py.pods.streams import PodStreams
from kiyot_py.pods.sync import CellSync
from kiyot_py.pods.volumes import PodVolumes
from kiyot_py.providers.base import CellFeatures, Provider, Readiness
from kiyot_py.registry.pullpath import PullGrants
from kiyot_py.store import Store

log = structlog.get_logger("kiyot.pods.runtime")


class PodRuntime:
    def __init__(self, settings: Settings, store: Store, provider: Provider, images: ImageManager,
                 agents: AgentFactory, grants: PullGrants | None = None, enroll: Enroller | None = None,
                 shared_images: SharedImages | None = None) -> None:
        self.index = Index(store)
        self.events = self.index.events  # GetContainerEvents
        self._provider = provider
        cells = Cells(settings, provider, agents, grants, enroll)
        self.cells = cells
        self._hostports = HostPorts()
        self.watch = CellWatch(self.index, provider, settings.cell_watch_interval, lost=self._cell_lost)
        self.volumes = PodVolumes(settings.volumes, ships=not provider.features.shares_node_disk)
        # The writable layers are reported on the filesystem ImageFsInfo names (the state dir).
        self.stats = StatsCache(self.index, str(settings.state_dir))
        self.sync = CellSync(self.index, cells, self.stats, self.watch,
                             before_exit=self.volumes.read_back_termination if self.volumes.ships else None)
        self.sandboxes = Sandboxes(settings, self.index, cells, self.sync, self._hostports, self.volumes)
        self.cell_images = CellImages(self.index, cells, images, shared_images)
        self.containers = Containers(self.index, cells, images, self.cell_images, self.sync, self.volumes)
        self.images = images
        self.streams = PodStreams(self.index, cells)
        self.gc = OrphanCollector(self.index, provider, settings.node_name, settings.gc_interval,
                                  settings.gc_grace)
        self.pools = WarmPools(settings, cells, self.index) if any(p.size for p in settings.pools) else None
        cells.pools = self.pools

    async def start(self) -> None:
        """Recover what the records name, then start watching cells, collecting orphans and
        keeping the warm pools full (after recovery: a claimed cell is its sandbox's)."""
        await recover(self.index, self.cells, self.sync, self.sandboxes, self._hostports, self.volumes)
        self.watch.start()
        self.gc.start()
        if self.pools is not None:
            await self.pools.start()

    async def _cell_lost(self, sb: Sandbox, now: Cell | None, reason: str, message: str) -> None:
        """A ready sandbox's cell runs no more: not ready, its containers exited; what is
        left of the cell (a stopped instance's disk) released. The kubelet then makes a
        new sandbox."""
        async with self.index.gate(sb.id).exclusive():
            if sb.state != SANDBOX_READY or sb.cell is None or sb.id not in self.index.sandboxes:
                return  # stopped or removed meanwhile
            await self.sync.unwatch(sb.id)
            self.volumes.forget(sb.id)
            await self._hostports.close(sb.id)
            if now is not None:
                sb.cell.state_reason = now.state_reason
            self.sync.cell_lost(sb, reason, message, cell_state=now.state if now is not None else "terminated")
            try:
                await self.cells.terminate(sb.cell.id)
            except KiyotError as exc:  # released at StopPodSandbox, or by the orphan collector
                log.warning("releasing a lost cell failed", cell=sb.cell.id, error=str(exc))
                return
            sb.cell.state = "terminated"
            self.index.save(sb)

    async def close(self) -> None:
        """Stop watching, shipping, collecting and refilling; cells and containers keep running."""
        if self.pools is not None:
            await self.pools.close()
        await self.watch.close()
        await self.gc.close()
        await self.sync.close()
        await self.volumes.close()
        await self._hostports.close_all()

    def _sandbox_of_pod(self, config: api_pb2.PodSandboxConfig) -> Sandbox | None:
        """The ready sandbox (with its cell) of the pod `config` names, its latest attempt."""
        md = config.metadata
        mine = [sb for sb in self.index.ready_sandboxes()
                if (sb.uid, sb.name, sb.namespace) == (md.uid, md.name, md.namespace) and sb.cell is not None]
        if not mine or not md.uid:
            return None
        return max(mine, key=lambda sb: sb.attempt)

    def facts_of_pod(self, config: api_pb2.PodSandboxConfig) -> CellFacts | None:
        """The facts of the ready cell of the pod `config` names (its latest attempt), if any."""
        sb = self._sandbox_of_pod(config)
        return sb.cell.facts if sb is not None and sb.cell is not None else None

    async def pull_into_pod_cell(self, config: api_pb2.PodSandboxConfig, record: Image,
                                 auth: Credentials | None) -> None:
        """For a cell that pulls for itself (no pull path): the image goes into the pod's
        cell during the PullImage that brought the credentials, which then go nowhere else."""
        sb = self._sandbox_of_pod(config)
        if sb is None or sb.cell is None or sb.cell.pull_path:
            return
        agent = self.cells.agent(sb)
        chosen = await self.images.for_cell(record, await self.cells.learn_facts(sb, agent))
        await agent.pull(**self.images.cell_pull(record, sb.cell, chosen.platform_digest, auth))

    @property
    def cell_features(self) -> CellFeatures:
        return self._provider.features

    async def readiness(self) -> Readiness:
        """Whether the provider can make cells now (Status's RuntimeReady and NetworkReady)."""
        return await self._provider.readiness()
