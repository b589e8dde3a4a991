"""The agent's settings, fixed at boot from the command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_SECCOMP_PROFILE = Path("/usr/share/containers/seccomp.json")


@dataclass(frozen=True)
class AgentConfig:
    host: str
    port: int
    tls_dir: Path  # cell.key, cell.crt (the cell's identity) and ca.crt (who may call)
    state_dir: Path
    netns: str | None = None          # /run/netns/NAME; None = share the agent's network
    cgroup_parent: str = "kiyot-cell"  # containers get <parent>/<id>
    runtime: str = "runc"
    runtime_path: str = "/usr/sbin/runc"
    conmon_path: str = "/usr/bin/conmon"
    catatonit_path: str = "/usr/bin/catatonit"  # the init of a pod's shared PID namespace
    skopeo_path: str = "skopeo"
    umoci_path: str = "umoci"
    max_body: int = 4 * 1024 * 1024
    # A container's log in the cell is cut into segments of about this size; the current
    # and the previous one are kept (the node holds the whole log).
    log_max_size: int = 10 * 1024 * 1024
    pull_timeout: float = 900.0
    # The runtime's --root; None = its default (/run/runc), where `runc list` on the cell
    # shows the pod's containers. Ids are 64-hex and unique, so agents may share it.
    runtime_root: Path | None = None
    # The cell's RuntimeDefault seccomp profile, reported in GET /v1/facts (containers-common's).
    seccomp_profile: Path | None = DEFAULT_SECCOMP_PROFILE
    # A cell that is a VM of its own pulls from the registries (with the pod's credentials
    # when the node sends them); a local cell fetches from the node's pull path only.
    direct_pulls: bool = False
    # The instance metadata service of a cell that is a VM (http://169.254.169.254): the
    # agent polls it for EC2's notices (spot interruption, rebalance); "" = none.
    instance_metadata: str = ""
    # Seconds between two samples of what the containers and the pod use (GET /v1/stats).
    stats_interval: float = 1.0
    # Where the node keeps its own read-only unpacks, for a cell that shares its disk (a
    # local cell): POST /v1/images/shared takes an image from under here instead of a
    # pull. None: the cell pulls every image itself.
    shared_images_dir: Path | None = None
    # Helpers (skopeo, umoci) die with the agent (PR_SET_PDEATHSIG, set in the child before
    # exec). Off where the image store runs in a process with threads (the node's, beside
    # gRPC's): Python code between fork and exec there can crash the child.
    helpers_die_with_agent: bool = True

    # Layout of the state directory, in one place.
    @property
    def images_dir(self) -> Path:
        return self.state_dir / "images"

    @property
    def containers_dir(self) -> Path:
        return self.state_dir / "containers"

    @property
    def pod_dir(self) -> Path:
        return self.state_dir / "pod"

    @property
    def volumes_dir(self) -> Path:
        return self.state_dir / "volumes"

    @property
    def tmp_dir(self) -> Path:
        return self.state_dir / "tmp"
