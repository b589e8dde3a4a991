"""After a restart (even kill -9): re-attach to every cell the records name.

One describe call for all cells. A ready sandbox whose cell is gone is marked lost; a
sandbox whose RunPodSandbox never returned is adopted (its launch resumes under the
same token, so the cell it may already have is the one it keeps); watchers, host ports
and log shippers start again where they were.
"""

from __future__ import annotations

import structlog

from kiyot_py.errors import InvalidArgument
from kiyot_py.gen.runtime.v1 import api_pb2
from kiyot_py.hostports import HostPortError, HostPorts
from kiyot_py.model import CONTAINER_CREATED, SANDBOX_READY
from kiyot_py.pods.cells import Cells
from kiyot_py.pods.cellwatch import why_gone
from kiyot_py.pods.index import Index
from kiyot_py.pods.sandboxes import Sandboxes, host_ports
from kiyot_py.pods.sync import CellSync
from kiyot_py.pods.volumes import PodVolumes

log = structlog.get_logger("kiyot.pods.recovery")


async def recover(index: Index, cells: Cells, sync: CellSync, sandboxes: Sandboxes,
                  hostports: HostPorts, volumes: PodVolumes) -> None:
    records = list(index.sandboxes.values())
    described = await cells.provider.describe([sb.cell.id for sb in records if sb.cell is not None])
    for sb in records:
        if sb.phase == "creating":
            if sb.launch_token:
                sandboxes.adopt(sb)
            else:  # from a version without launch tokens: nothing to adopt it by
                log.info("dropping half-created sandbox", sandbox=sb.id)
                if sb.cell is not None:
                    await cells.terminate(sb.cell.id)
                index.forget(sb)
            continue
        if sb.state != SANDBOX_READY or sb.cell is None:
            continue
        cell = described.get(sb.cell.id)
        if cell is None or cell.gone:
            reason, message = why_gone(sb.cell, cell)
            log.warning("cell is gone", sandbox=sb.id, cell=sb.cell.id, reason=reason, message=message)
            if cell is not None:
                await cells.terminate(cell.id)  # release what is left of it
                sb.cell.state_reason = cell.state_reason
            sync.cell_lost(sb, reason, message)  # and what was left of it released
            continue
        cell.notices = sb.cell.notices  # heard by the node, not the provider's to know
        cell.facts = sb.cell.facts  # learned from the agent, not the provider's to know
        sb.cell = cell
        index.save(sb)
        try:
            config = api_pb2.PodSandboxConfig.FromString(sb.config)
            await hostports.open(sb.id, cell.address, host_ports(config))
        except (HostPortError, InvalidArgument) as exc:
            log.warning("host ports not reopened", sandbox=sb.id, error=str(exc))
        sync.watch(sb)
        volumes.rewatch(sb, cells.agent(sb), [api_pb2.ContainerConfig.FromString(c.config)
                                               for c in index.containers_of(sb.id) if c.config])
        for c in index.containers_of(sb.id):
            if c.state != CONTAINER_CREATED and not c.log_done:
                sync.ship_logs(c, sb)
    log.info("state recovered", sandboxes=len(index.sandboxes), containers=len(index.containers))
