"""Judge a critest run: every failed spec must be on the project's list of known failures.

    python tests/conformance/check.py REPORT.json KNOWN-FAILURES.toml

REPORT.json is ginkgo's JSON report (run-critest.sh writes it). Prints the suite's summary
line ("N passed, N failed, N skipped"), each failure with its reason from the list, and
the list's entries that passed. Exit status 1 when a spec failed that the list does not
name (or the suite itself failed to run), 0 otherwise.
"""

from __future__ import annotations

import json
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

# What each known failure is, as the list's `kind` says.
KINDS = {
    "later": "left to a later issue",
    "by-design": "a cell is the pod's host, never the node",
    "environment": "these machines cannot run it",
}


@dataclass(frozen=True)
class Known:
    spec: str
    kind: str
    reason: str
    # True where the spec passes today although it is wrong by design (the list says why).
    may_pass: bool = False


@dataclass(frozen=True)
class Outcome:
    passed: list[str]
    failed: list[str]
    skipped: list[str]
    broken: list[str]  # suite-level nodes (BeforeSuite, ...) that did not pass


def load_known(path: Path) -> dict[str, Known]:
    data = tomllib.loads(path.read_text())
    known: dict[str, Known] = {}
    for i, entry in enumerate(data.get("known", [])):
        try:
            item = Known(**entry)
        except TypeError as exc:
            raise SystemExit(f"{path}: entry {i}: {exc}") from None
        if item.kind not in KINDS:
            raise SystemExit(f"{path}: entry {i}: kind {item.kind!r} is not one of {sorted(KINDS)}")
        if not item.reason.strip():
            raise SystemExit(f"{path}: entry {i} ({item.spec}) gives no reason")
        if item.spec in known:
            raise SystemExit(f"{path}: {item.spec!r} is listed twice")
        known[item.spec] = item
    return known


def spec_name(report: dict) -> str:
    return " ".join((report.get("ContainerHierarchyTexts") or []) + [report.get("LeafNodeText", "")])


def read_report(path: Path) -> Outcome:
    passed, failed, skipped, broken = [], [], [], []
    for suite in json.loads(path.read_text()):
        for spec in suite.get("SpecReports") or []:
            state = spec.get("State")
            if spec.get("LeafNodeType") != "It":
                if state not in ("passed", "skipped"):
                    broken.append(f"[{spec.get('LeafNodeType')}] {state}")
                continue
            name = spec_name(spec)
            if state == "passed":
                passed.append(name)
            elif state in ("skipped", "pending"):
                skipped.append(name)
            else:
                failed.append(name)
    return Outcome(passed, failed, skipped, broken)


def judge(outcome: Outcome, known: dict[str, Known]) -> tuple[list[str], int]:
    """(lines to print, exit status)."""
    lines = [f"{len(outcome.passed)} passed, {len(outcome.failed)} failed, {len(outcome.skipped)} skipped"]
    new = [name for name in outcome.failed if name not in known]
    for name in outcome.failed:
        item = known.get(name)
        if item is not None:
            lines.append(f"  known   {name}\n          {item.kind}: {item.reason}")
    for name in new:
        lines.append(f"  NEW     {name}")
    for name in outcome.passed:
        item = known.get(name)
        if item is not None and not item.may_pass:
            lines.append(f"  passes  {name}\n          listed as a known failure: take it off the list")
    ran = set(outcome.passed) | set(outcome.failed) | set(outcome.skipped)
    for name in known:
        if name not in ran:
            lines.append(f"  absent  {name}\n          listed, but not in this run (renamed, or filtered out)")
    for node in outcome.broken:
        lines.append(f"  BROKEN  {node}")
    status = 1 if new or outcome.broken else 0
    verdict = (f"{len(new)} spec(s) failed that the list does not name" if new
               else "the suite did not run through" if outcome.broken
               else f"every failure is on the list ({len(outcome.failed)} known)")
    lines.append(f"conformance: {verdict}")
    return lines, status


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    lines, status = judge(read_report(Path(argv[1])), load_known(Path(argv[2])))
    print("\n".join(lines))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
