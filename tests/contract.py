"""The agent contract's route table, read from cells/API.md (the one place it is written)."""

from __future__ import annotations

import re
from pathlib import Path

API_MD = Path(__file__).resolve().parent.parent / "cells" / "API.md"


def routes() -> list[tuple[str, str]]:
    """(METHOD, /path/{param}) for each row of the table under '## Routes'."""
    text = API_MD.read_text()
    section = text.split("## Routes", 1)[1].split("\n## ", 1)[0]
    found = re.findall(r"^\|\s*(GET|POST|PUT|DELETE)\s*\|\s*(/v1/\S*)\s*\|", section, re.M)
    assert found, "no routes found in cells/API.md"
    return found
