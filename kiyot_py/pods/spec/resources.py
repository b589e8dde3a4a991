"""linux.resources (cpu, memory, pids) and the OOM score.

Unified (cgroup v2) keys other than pids.max and hugepage limits are not applied: runc
refuses unified keys on cgroup v1, where cells have run so far (a cell on v2 says so in
`CellFacts.cgroup_version`, should they be wanted there). A negative ``oom_score_adj``
is clamped to 0: runc create fails with one in these cells. rlimits are the agent's
(it knows the cell's nr_open).
"""

from __future__ import annotations

from typing import Any

from kiyot_py.gen.runtime.v1 import api_pb2
from kiyot_py.pods.spec.errors import SpecError


def apply_resources(
    r: api_pb2.LinuxContainerResources, resources: dict, process: dict
) -> None:
    cpu: dict[str, Any] = {}
    if r.cpu_shares > 0:
        cpu["shares"] = r.cpu_shares
    if r.cpu_quota != 0:
        cpu["quota"] = r.cpu_quota
    if r.cpu_period > 0:
        cpu["period"] = r.cpu_period
    if r.cpuset_cpus:
        cpu["cpus"] = r.cpuset_cpus
    if r.cpuset_mems:
        cpu["mems"] = r.cpuset_mems
    if cpu:
        resources["cpu"] = cpu
    memory: dict[str, Any] = {}
    if r.memory_limit_in_bytes > 0:
        memory["limit"] = r.memory_limit_in_bytes
    if r.memory_swap_limit_in_bytes > 0:
        memory["swap"] = r.memory_swap_limit_in_bytes
    if memory:
        resources["memory"] = memory
    pids = r.unified.get("pids.max")
    if pids:
        if pids == "max":
            pass
        elif pids.isdigit() and int(pids) > 0:
            resources["pids"] = {"limit": int(pids)}
        else:
            raise SpecError(f"invalid pids.max {pids!r}")
    process["oomScoreAdj"] = max(0, min(int(r.oom_score_adj), 1000))


def linux_resources(r: api_pb2.LinuxContainerResources) -> dict[str, Any]:
    """`r` as the cpu, memory and pids of an OCI linux.resources, converted as for a create
    spec: what UpdateContainerResources asks the cell to apply (a field left at zero is
    left out, and the cell keeps its value).
    The OOM score is not among them: runc cannot change it in a running container."""
    resources: dict[str, Any] = {}
    apply_resources(r, resources, {})
    return resources
