"""The conformance step's judge: only a failure the list does not name fails the step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conformance import check

LIST = Path(__file__).resolve().parents[1] / "conformance" / "known-failures.toml"


def spec(hierarchy: list[str], leaf: str, state: str) -> dict:
    return {"LeafNodeType": "It", "ContainerHierarchyTexts": hierarchy, "LeafNodeText": leaf, "State": state}


def report(tmp_path: Path, *specs: dict) -> Path:
    path = tmp_path / "report.json"
    path.write_text(json.dumps([{"SpecReports": list(specs)}]))
    return path


def known(tmp_path: Path, text: str) -> dict[str, check.Known]:
    path = tmp_path / "known.toml"
    path.write_text(text)
    return check.load_known(path)


def test_the_projects_list_is_valid_and_every_entry_has_a_reason():
    entries = check.load_known(LIST)
    assert entries and all(e.reason.strip() for e in entries.values())
    # The by-design entries of the issue are there (HostPID passes in a cell's own PID
    # namespace: both of its containers are the cell's; portforward in host network passes
    # as a hostNetwork pod's declared ports are served on the node).
    names = " | ".join(entries)
    for part in ("HostNetwork is true", "HostIpc is true", "vice versa"):
        assert part in names
    assert "HostPID" not in names and "portforward in host network" not in names


def test_a_failure_on_the_list_passes_and_one_off_it_fails(tmp_path):
    listed = known(tmp_path, '[[known]]\nspec = "[k8s.io] A b"\nkind = "later"\nreason = "#16"\n')
    outcome = check.read_report(report(
        tmp_path, spec(["[k8s.io] A"], "b", "failed"), spec(["[k8s.io] C"], "d", "passed"),
        spec(["[k8s.io] E"], "f", "skipped")))
    lines, status = check.judge(outcome, listed)
    assert status == 0
    assert lines[0] == "1 passed, 1 failed, 1 skipped"

    outcome = check.read_report(report(
        tmp_path, spec(["[k8s.io] A"], "b", "failed"), spec(["[k8s.io] C"], "d", "timedout")))
    lines, status = check.judge(outcome, listed)
    assert status == 1
    assert any(line.startswith("  NEW     [k8s.io] C d") for line in lines)


def test_a_listed_spec_that_passes_is_reported_unless_it_may(tmp_path):
    listed = known(tmp_path, '[[known]]\nspec = "[k8s.io] A b"\nkind = "later"\nreason = "#16"\n'
                             '[[known]]\nspec = "[k8s.io] A c"\nkind = "by-design"\nreason = "x"\nmay_pass = true\n')
    outcome = check.read_report(report(
        tmp_path, spec(["[k8s.io] A"], "b", "passed"), spec(["[k8s.io] A"], "c", "passed")))
    lines, status = check.judge(outcome, listed)
    assert status == 0
    text = "\n".join(lines)
    assert "passes  [k8s.io] A b" in text and "A c" not in text


def test_a_broken_suite_fails(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps([{"SpecReports": [{"LeafNodeType": "BeforeSuite", "State": "failed"}]}]))
    _, status = check.judge(check.read_report(path), {})
    assert status == 1


@pytest.mark.parametrize("entry, message", [
    ('spec = "x"\nkind = "soon"\nreason = "r"', "kind"),
    ('spec = "x"\nkind = "later"\nreason = " "', "no reason"),
    ('spec = "x"\nkind = "later"', "reason"),
])
def test_a_bad_list_is_refused(tmp_path, entry, message):
    with pytest.raises(SystemExit) as err:
        known(tmp_path, f"[[known]]\n{entry}\n")
    assert message in str(err.value)
