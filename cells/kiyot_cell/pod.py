"""PUT /v1/pod: the pod this cell runs, and its /etc files.

The files are rewritten *in place* (not tmp+rename): containers bind-mount them, and a
bind mount pins the inode, so a rename would leave running containers on the old file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import invalid
from .records import atomic_write_json

HOSTNAME_RE = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9\-.]{0,251}[a-zA-Z0-9])?$")


@dataclass
class PodSpec:
    sandbox_id: str
    hostname: str
    servers: list[str] = field(default_factory=list)
    searches: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, body: dict[str, Any]) -> "PodSpec":
        sid = body.get("sandbox_id")
        host = body.get("hostname")
        if not isinstance(sid, str) or not sid:
            raise invalid("'sandbox_id' is required")
        if not isinstance(host, str) or not HOSTNAME_RE.match(host):
            raise invalid("'hostname' is required and must be a valid host name")
        dns = body.get("dns") or {}
        if not isinstance(dns, dict):
            raise invalid("'dns' must be an object")
        lists = {}
        for k in ("servers", "searches", "options"):
            v = dns.get(k) or []
            if not isinstance(v, list) or not all(isinstance(x, str) and x and "\n" not in x and " " not in x for x in v):
                raise invalid(f"'dns.{k}' must be a list of words")
            lists[k] = v
        labels = body.get("labels") or {}
        if not isinstance(labels, dict):
            raise invalid("'labels' must be an object")
        return cls(sandbox_id=sid, hostname=host, labels={str(k): str(v) for k, v in labels.items()}, **lists)


class Pod:
    def __init__(self, pod_dir: Path) -> None:
        self.dir = pod_dir
        self.etc = pod_dir / "etc"
        self.spec: PodSpec | None = None

    def load(self) -> None:
        p = self.dir / "pod.json"
        if p.exists():
            self.spec = PodSpec(**json.loads(p.read_text()))

    def put(self, body: dict[str, Any]) -> dict[str, Any]:
        spec = PodSpec.parse(body)
        if spec != self.spec or not (self.etc / "resolv.conf").exists():
            self.etc.mkdir(parents=True, exist_ok=True)
            _write_in_place(self.etc / "hostname", f"{spec.hostname}\n")
            _write_in_place(self.etc / "hosts",
                            f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                            f"127.0.0.1\t{spec.hostname}\n")
            _write_in_place(self.etc / "resolv.conf", _resolv(spec))
            atomic_write_json(self.dir / "pod.json", asdict(spec))
            self.spec = spec
        return {"etc_dir": str(self.etc)}


def _resolv(spec: PodSpec) -> str:
    if not spec.servers:
        try:
            return Path("/etc/resolv.conf").read_text()  # the cell's own
        except OSError:
            return ""
    lines = [f"nameserver {s}" for s in spec.servers]
    if spec.searches:
        lines.append("search " + " ".join(spec.searches))
    if spec.options:
        lines.append("options " + " ".join(spec.options))
    return "\n".join(lines) + "\n"


def _write_in_place(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
