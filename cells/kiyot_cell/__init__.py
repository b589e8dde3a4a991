"""kiyot_cell: the agent that runs inside each cell (see cells/API.md)."""

__version__ = "0.1.0"
API_VERSION = "v1"
