"""Named points where the service can be made to die at once, as a power cut would.

`KIYOTPY_CRASH_AT=<name>` in the service's environment makes `crash_point(<name>)` SIGKILL
the process the first time it is reached. The kill -9 tests put it at each step of
bringing a cell up and taking it down; unset, as always in production, a point costs one
comparison. A kill -9 from outside could never land between two given steps. (Not a
KIYOT_ variable: those are settings, and an unknown one is refused.)
"""

from __future__ import annotations

import os
import signal

_AT = os.environ.get("KIYOTPY_CRASH_AT", "")


def crash_point(name: str) -> None:
    if _AT and name == _AT:
        os.kill(os.getpid(), signal.SIGKILL)
