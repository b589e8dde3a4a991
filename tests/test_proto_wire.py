"""The CRI v1 wire contract: our proto must be wire-identical to upstream.

Compares descriptors (not text) of proto/runtime/v1/api.proto against the
upstream k8s.io/cri-api api.proto. The upstream file is looked up at
$KIYOT_CRI_REFERENCE, else /work/shared/reference/cri-api/api.proto; the
comparison is skipped when neither exists.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

REPO = Path(__file__).resolve().parent.parent
OUR_PROTO = REPO / "proto" / "runtime" / "v1" / "api.proto"
DEFAULT_REFERENCE = Path("/work/shared/reference/cri-api/api.proto")

FDP = descriptor_pb2.FieldDescriptorProto
_TYPE_NAMES = {v: k for k, v in FDP.Type.items()}
_LABEL_NAMES = {v: k for k, v in FDP.Label.items()}


def _reference_path() -> Path | None:
    env = os.environ.get("KIYOT_CRI_REFERENCE")
    path = Path(env) if env else DEFAULT_REFERENCE
    return path if path.is_file() else None


def compile_descriptor(proto: Path, tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    """Compile one .proto with grpc_tools.protoc and return its FileDescriptorProto."""
    import grpc_tools
    from grpc_tools import protoc

    out = tmp_path / (proto.stem + f"-{abs(hash(str(proto)))}.pb")
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto.parent}",
            f"-I{well_known}",
            "--include_imports",
            f"--descriptor_set_out={out}",
            str(proto),
        ]
    )
    assert rc == 0, f"protoc failed ({rc}) on {proto}"
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(out.read_bytes())
    # With --include_imports the requested file comes last.
    return fds.file[-1]


# ---------------------------------------------------------------- comparator


def _field_facts(msg: descriptor_pb2.DescriptorProto, f: FDP, map_entries: set[str]) -> str:
    oneof = msg.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None
    is_map = f.label == FDP.LABEL_REPEATED and f.type_name in map_entries
    opts = []
    if f.options.deprecated:
        opts.append("deprecated")
    if f.options.debug_redact:
        opts.append("debug_redact")
    return (
        f"number={f.number} type={_TYPE_NAMES[f.type]} type_name={f.type_name or '-'} "
        f"label={_LABEL_NAMES[f.label]} proto3_optional={f.proto3_optional} "
        f"oneof={oneof} map={is_map} json_name={f.json_name} options={','.join(opts) or '-'}"
    )


def _walk_enum(facts: dict[str, str], prefix: str, e: descriptor_pb2.EnumDescriptorProto) -> None:
    name = f"{prefix}.{e.name}"
    facts[f"enum {name}"] = f"values={len(e.value)}"
    for v in e.value:
        facts[f"enum {name} value {v.name}"] = f"number={v.number}"


def _walk_message(
    facts: dict[str, str], prefix: str, m: descriptor_pb2.DescriptorProto, map_entries: set[str]
) -> None:
    name = f"{prefix}.{m.name}"
    facts[f"message {name}"] = (
        f"map_entry={m.options.map_entry} fields={len(m.field)} "
        f"oneofs={[o.name for o in m.oneof_decl]} "
        f"reserved={[(r.start, r.end) for r in m.reserved_range]}/{list(m.reserved_name)}"
    )
    for f in m.field:
        facts[f"message {name} field {f.name}"] = _field_facts(m, f, map_entries)
    for n in m.nested_type:
        _walk_message(facts, name, n, map_entries)
    for e in m.enum_type:
        _walk_enum(facts, name, e)


def _collect_map_entries(prefix: str, msgs, out: set[str]) -> None:
    for m in msgs:
        name = f"{prefix}.{m.name}"
        if m.options.map_entry:
            out.add(name)
        _collect_map_entries(name, m.nested_type, out)


def describe(fd: descriptor_pb2.FileDescriptorProto) -> dict[str, str]:
    """Flatten a file descriptor into {"what": "wire-relevant facts"}."""
    facts: dict[str, str] = {"file": f"package={fd.package} syntax={fd.syntax or 'proto2'}"}
    prefix = f".{fd.package}" if fd.package else ""
    map_entries: set[str] = set()
    _collect_map_entries(prefix, fd.message_type, map_entries)
    for s in fd.service:
        facts[f"service {s.name}"] = f"methods={len(s.method)}"
        for r in s.method:
            facts[f"service {s.name} rpc {r.name}"] = (
                f"input={r.input_type} output={r.output_type} "
                f"client_streaming={r.client_streaming} server_streaming={r.server_streaming}"
            )
    for m in fd.message_type:
        _walk_message(facts, prefix, m, map_entries)
    for e in fd.enum_type:
        _walk_enum(facts, prefix, e)
    return facts


def compare(ours: descriptor_pb2.FileDescriptorProto, ref: descriptor_pb2.FileDescriptorProto) -> list[str]:
    """Every difference between two file descriptors, one line each (empty = identical)."""
    a, b = describe(ours), describe(ref)
    diffs = []
    for key in sorted(a.keys() | b.keys()):
        if key not in a:
            diffs.append(f"missing in ours: {key} [{b[key]}]")
        elif key not in b:
            diffs.append(f"extra in ours (not upstream): {key} [{a[key]}]")
        elif a[key] != b[key]:
            diffs.append(f"differs: {key}\n    ours:     {a[key]}\n    upstream: {b[key]}")
    return diffs


# --------------------------------------------------------------------- tests


def test_generated_stubs_are_fresh():
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gen_proto.py"), "--check"],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, (
        f"tools/gen_proto.py --check failed (rc={proc.returncode}):\n{proc.stdout}{proc.stderr}"
    )


def test_stubs_import():
    from kiyot_py.gen.runtime.v1 import api_pb2, api_pb2_grpc

    assert api_pb2.DESCRIPTOR.package == "runtime.v1"
    assert hasattr(api_pb2_grpc, "RuntimeServiceStub")
    assert hasattr(api_pb2_grpc, "add_ImageServiceServicer_to_server")


def test_rpc_counts(tmp_path):
    ours = compile_descriptor(OUR_PROTO, tmp_path)
    services = {s.name: len(s.method) for s in ours.service}
    assert services == {"RuntimeService": 35, "ImageService": 6}


def test_wire_identical_to_upstream(tmp_path):
    ref_path = _reference_path()
    if ref_path is None:
        pytest.skip(
            "upstream CRI api.proto not found: set KIYOT_CRI_REFERENCE or provide "
            f"{DEFAULT_REFERENCE}"
        )
    ours = compile_descriptor(OUR_PROTO, tmp_path)
    ref = compile_descriptor(ref_path, tmp_path)
    ref_services = {s.name: len(s.method) for s in ref.service}
    assert ref_services == {"RuntimeService": 35, "ImageService": 6}, ref_services
    diffs = compare(ours, ref)
    assert not diffs, f"{len(diffs)} wire difference(s) vs {ref_path}:\n" + "\n".join(diffs)


def test_comparator_detects_mutations(tmp_path):
    ours = compile_descriptor(OUR_PROTO, tmp_path)
    assert compare(ours, ours) == []

    mutated = descriptor_pb2.FileDescriptorProto()
    mutated.CopyFrom(ours)
    mount = next(m for m in mutated.message_type if m.name == "Mount")
    next(f for f in mount.field if f.name == "readonly").number = 99
    images = next(s for s in mutated.service if s.name == "ImageService")
    next(r for r in images.method if r.name == "StreamImages").server_streaming = False
    signal = next(e for e in mutated.enum_type if e.name == "Signal")
    del signal.value[-1]

    diffs = "\n".join(compare(mutated, ours))
    assert "message .runtime.v1.Mount field readonly" in diffs
    assert "number=99" in diffs
    assert "service ImageService rpc StreamImages" in diffs
    assert "missing in ours: enum .runtime.v1.Signal value SIGRTMAX" in diffs
