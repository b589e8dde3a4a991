"""The interface every cell provider implements (local netns cells now, EC2 next)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from kiyot_py.model import Cell

# Tags every cell carries, so that the cloud alone can say who owns what.
TAG_NODE = "kiyot-node"
TAG_SANDBOX = "kiyot-sandbox"


class ProviderError(RuntimeError):
    pass


@dataclass(frozen=True)
class CellFeatures:
    """What this provider's cells can do, as the Status RPC advertises it to the kubelet."""

    # `rro` mounts: the cell's OCI runtime knows the option and its kernel has mount_setattr.
    recursive_read_only_mounts: bool = False
    user_namespaces: bool = False


class Provider(Protocol):
    name: str

    async def start(self) -> None:
        """Prepare shared infrastructure (a bridge, a client) and revive cells' agents."""

    @property
    def features(self) -> CellFeatures:
        """What the cells can do (known once start() has run)."""

    async def create_cell(self, sandbox_id: str, tags: dict[str, str]) -> Cell:
        """Create the cell for a sandbox, or return the one that already exists for it."""

    async def delete_cell(self, cell_id: str) -> None:
        """Release a cell and everything it holds. Unknown cells are already deleted."""

    async def describe_cell(self, cell_id: str) -> Cell | None:
        """The cell as the provider sees it now, or None when it no longer exists."""

    async def list_cells(self, tags: dict[str, str]) -> list[Cell]:
        """Every cell carrying all of these tags."""

    async def close(self) -> None:
        """Let go of clients; cells keep running."""
