#!/usr/bin/env python3
"""How long a real cell agent takes to refuse hostile images, and to go on after them.

    python bench/hostile_images.py -n 5         # as root: an agent of its own on 127.0.0.1

Pushes the tests' hostile images (tests/support/images.py) to the tests' registry on
127.0.0.1:5000 (starting one if none answers), then for each: POST /v1/images/pull
(refused with 422) and, right after, a pull and run of busybox in the same cell (the cell
goes on). Prints min / median / max in milliseconds. No figure is asserted anywhere.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.cells import conftest as cell_tests  # the agent the cell tests run, and the node side it pulls from
from tests.support.images import push_hostile_images, push_test_images
from tests.support.pullnode import PullNode
from tests.support.registry import REGISTRY, start_registry, stop_registry, v2_up


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=5, help="rounds per image (default 5)")
    ns = ap.parse_args()
    registry = None if v2_up() else start_registry(Path(tempfile.mkdtemp(prefix="kiyot-bench-registry-")))
    try:
        busybox = push_test_images(REGISTRY)["busybox"]
        hostile = push_hostile_images(REGISTRY)
        node = cell_tests._NODE["node"] = PullNode(Path(tempfile.mkdtemp(prefix="kiyot-bench-node-")))
        rows = []
        for name, img in hostile.items():
            refuse, goes_on = [], []
            for _ in range(ns.n):
                agent = cell_tests.Agent(Path(tempfile.mkdtemp(prefix="kiyot-bench-cell-"))).start()
                try:
                    body = agent.pull_body(img)  # the node's fetch is not what is measured
                    t0 = time.monotonic()
                    r = agent.call("POST", "/v1/images/pull", body, timeout=600)
                    t1 = time.monotonic()
                    if r.status != 422:
                        raise SystemExit(f"{name}: expected 422, got {r.status} {r.body[:300]!r}")
                    agent.pull(busybox)
                    rec = agent.run(busybox, ["true"])
                    agent.wait_state(rec["id"], "exited")
                    refuse.append((t1 - t0) * 1000)
                    goes_on.append((time.monotonic() - t1) * 1000)
                finally:
                    agent.cleanup()
            rows.append((name, refuse, goes_on))
        node.close()
    finally:
        if registry is not None:
            stop_registry(registry)
    print(f"{ns.n} rounds, a fresh agent each")
    print(f"{'image':24} | {'refused (ms) min/med/max':27} | {'then busybox pull+run (ms)':27}")
    print("-" * 84)
    for name, refuse, goes_on in rows:
        cells = [f"{min(v):7.1f} {statistics.median(v):7.1f} {max(v):7.1f}   " for v in (refuse, goes_on)]
        print(f"{name:24} | {cells[0]:27} | {cells[1]:27}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
