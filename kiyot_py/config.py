"""Settings: defaults, then a TOML file, then KIYOT_* environment, then flags."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A setting has a value the service cannot use."""


@dataclass
class LocalCellSettings:
    bridge: str = "kiyot0"
    subnet: str = "10.89.0.0/16"
    agent_port: int = 9276
    pull_path_port: int = 5380
    runtime: str = "runc"
    # A container's log inside a cell is cut past this size (the node keeps it whole).
    log_max_size: int = 10 * 1024 * 1024
    # CIDRs (comma-separated) the node never forwards a cell's packets to, on top of what
    # it never forwards anyway: link-local (cloud metadata), its own addresses, multicast.
    deny_egress: str = ""
    # A local cell shares this node's kernel: a privileged container in it is root on the
    # node. Refused unless this is set (a node that runs trusted pods only, or a test).
    allow_privileged: bool = False


@dataclass
class AwsSettings:
    """EC2 cells (provider = "aws"). Credentials come from boto3's usual chain."""

    region: str = ""
    endpoint_url: str = ""  # "" = AWS's own; set for an EC2-compatible API (the simulator)
    subnets: str = ""  # comma-separated subnet ids, in the node's VPC: where cells are launched
    security_groups: str = ""  # comma-separated group ids for the cells
    # The cell image: an AMI id (ami-...) or the name of an SSM parameter that holds one.
    image: str = ""
    instance_profile: str = ""  # the cells' instance profile (name); "" = none
    root_volume_gib: int = 0  # the cells' root volume; 0 = the image's own size
    # The instance types a pod may get (comma-separated types or families, e.g.
    # "t3,m5.large"); "" = every type with a known price.
    instance_types: str = ""
    # What the cell's OS and agent take, on top of the pod's requests.
    headroom_cpu_millis: int = 100
    headroom_memory_mib: int = 256
    agent_port: int = 9276
    max_concurrent_calls: int = 8  # EC2 API calls in flight at once
    catalog_max_age: float = 3600.0  # seconds before instance types and offerings are fetched again
    # The market of a pod that says nothing (annotation kiyot-py.io/spot): "never" (on-demand
    # only), "preferred" (spot, else on-demand) or "always" (spot only).
    spot: str = "never"
    spot_price_max_age: float = 300.0  # seconds before the spot price history is read again
    # Seconds a (type, zone, market) that EC2 refused for want of capacity is not tried again.
    unavailable_offering_ttl: float = 180.0
    # An SQS queue (URL or name) that EventBridge feeds with spot interruption warnings,
    # rebalance recommendations and instance state changes, as Karpenter's; "" = none.
    interruption_queue: str = ""


@dataclass
class VolumeSettings:
    """The pod's volumes on cells that cannot see this node's disk (EC2 cells)."""

    # The kubelet's --root-dir: each pod's volumes are under <kubelet_root>/pods/<pod uid>.
    kubelet_root: str = "/var/lib/kubelet"
    # Other node paths (comma-separated) a pod's hostPath may name: shipped once, at create.
    allowed_host_paths: str = ""
    # Seconds between checks of every configmap, secret and projected volume, behind inotify.
    sync_interval: float = 10.0


@dataclass
class StreamingSettings:
    """The server the kubelet's exec, attach and port-forward clients connect to."""

    # An address of this node that the kubelet (and crictl) reach; plain HTTP, as the
    # kubelet's own streaming server: keep it on loopback unless the network is trusted.
    address: str = "127.0.0.1"
    port: int = 0  # 0: a free port, chosen at each start


@dataclass
class PoolSettings:
    """A warm pool (`[[pools]]`): standby cells of one shape, booted and their agents
    answering, that RunPodSandbox claims instead of waiting for a boot."""

    name: str = "default"  # a tag value: lower-case letters, digits and '-'
    size: int = 0  # standby cells kept ready (0: the pool is off)
    # The standby cells' shape, as a pod's requests would give it (0: the provider's
    # smallest cell). A pod is given a standby cell only if that cell fits it.
    cpu_millis: int = 0
    memory_mib: int = 0
    architecture: str = ""  # GOARCH; "": the provider's default


POOL_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
MAX_POOL_SIZE = 64


@dataclass
class Settings:
    socket: Path = Path("/run/kiyot-py/kiyot.sock")
    state_dir: Path = Path("/var/lib/kiyot-py")
    node_name: str = field(default_factory=lambda: os.uname().nodename)
    provider: str = "local"
    registries_conf: Path | None = None
    log_level: str = "info"
    # The whole of a cell's start (running, enrolled, its agent answering): past it the cell
    # is released and RunPodSandbox fails. Keep it under the kubelet's runtime request timeout.
    cell_boot_timeout: float = 60.0
    # How often cells of this node that no sandbox owns are looked for (terminated once
    # seen twice in a row).
    gc_interval: float = 60.0
    gc_grace: float = 120.0  # and left alone for this long after their launch
    # How often the provider is asked about the cells of ready sandboxes (one call for all):
    # a cell terminated or stopped behind the node's back is seen within this period.
    cell_watch_interval: float = 10.0
    local: LocalCellSettings = field(default_factory=LocalCellSettings)
    aws: AwsSettings = field(default_factory=AwsSettings)
    volumes: VolumeSettings = field(default_factory=VolumeSettings)
    streaming: StreamingSettings = field(default_factory=StreamingSettings)
    pools: list[PoolSettings] = field(default_factory=list)

    def validate(self) -> None:
        if self.provider not in ("local", "aws"):
            raise ConfigError(f"provider {self.provider!r} is not one of 'local', 'aws'")
        if self.provider == "aws":
            missing = [name for name in ("region", "subnets", "image") if not getattr(self.aws, name).strip()]
            if missing:
                raise ConfigError(f"provider 'aws' needs aws.{', aws.'.join(missing)}")
            if self.aws.max_concurrent_calls < 1:
                raise ConfigError("aws.max_concurrent_calls must be at least 1")
            if self.aws.spot not in ("never", "preferred", "always"):
                raise ConfigError(f"aws.spot {self.aws.spot!r} is not one of 'never', 'preferred', 'always'")
        if self.volumes.sync_interval <= 0:
            raise ConfigError(f"volumes.sync_interval must be above 0 seconds, got {self.volumes.sync_interval}")
        try:
            ipaddress.ip_address(self.streaming.address)
        except ValueError:
            raise ConfigError(f"streaming.address {self.streaming.address!r} is not an IP address") from None
        if not 0 <= self.streaming.port < 65536:
            raise ConfigError(f"streaming.port must be within 0-65535, got {self.streaming.port}")
        if self.cell_watch_interval <= 0:
            raise ConfigError(f"cell_watch_interval must be above 0 seconds, got {self.cell_watch_interval}")
        try:
            net = ipaddress.ip_network(self.local.subnet)
        except ValueError as exc:
            raise ConfigError(f"local.subnet: {exc}") from None
        if net.num_addresses < 4:
            raise ConfigError(f"local.subnet {net} is too small for cells")
        if self.local.log_max_size < 4096:
            raise ConfigError(f"local.log_max_size must be at least 4096 bytes, got {self.local.log_max_size}")
        for entry in (e.strip() for e in self.local.deny_egress.split(",")):
            if not entry:
                continue
            try:
                ipaddress.ip_network(entry)
            except ValueError as exc:
                raise ConfigError(
                    f"local.deny_egress: {entry!r} is not a CIDR such as 10.0.0.0/8 or fd00::/8 ({exc})"
                ) from None
        names: set[str] = set()
        for i, pool in enumerate(self.pools):
            where = f"pools[{i}]"
            if not POOL_NAME_RE.match(pool.name):
                raise ConfigError(f"{where}.name {pool.name!r}: use 1-32 lower-case letters, digits and '-'")
            if pool.name in names:
                raise ConfigError(f"{where}.name {pool.name!r}: two pools have this name")
            names.add(pool.name)
            if not 0 <= pool.size <= MAX_POOL_SIZE:
                raise ConfigError(f"{where}.size must be within 0-{MAX_POOL_SIZE}, got {pool.size}")
            if pool.cpu_millis < 0 or pool.memory_mib < 0:
                raise ConfigError(f"{where}: cpu_millis and memory_mib cannot be negative")
        if self.registries_conf is not None and not self.registries_conf.is_file():
            raise ConfigError(f"registries_conf {self.registries_conf} does not exist")


# Environment names: KIYOT_SOCKET, KIYOT_STATE_DIR, KIYOT_LOCAL_SUBNET, ... Every KIYOT_*
# variable is a setting, and an unknown one is an error (a typo never passes silently);
# the project's scripts and tests use KIYOTPY_* for their own knobs.
def _apply(obj: Any, values: dict[str, Any], where: str) -> None:
    for key, value in values.items():
        names = {f.name: f for f in dataclasses.fields(obj)}
        if key not in names:
            raise ConfigError(f"{where}: unknown setting {key!r}")
        current = getattr(obj, key)
        item_type = _TABLE_ARRAYS.get(str(names[key].type))
        if item_type is not None:  # an array of tables, e.g. [[pools]]
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigError(f"{where}: {key} must be an array of tables ([[{key}]])")
            items = []
            for i, table in enumerate(value):
                item = item_type()
                _apply(item, table, f"{where}.{key}[{i}]")
                items.append(item)
            setattr(obj, key, items)
            continue
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {key} must be a table")
            _apply(current, value, f"{where}.{key}")
            continue
        setattr(obj, key, _coerce(str(names[key].type), value, f"{where}.{key}"))


_TABLE_ARRAYS: dict[str, type] = {"list[PoolSettings]": PoolSettings}


def _coerce(type_name: str, value: Any, where: str) -> object:
    try:
        if "Path" in type_name:
            return None if value in (None, "") else Path(str(value))
        if type_name == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if type_name == "int":
            return int(value)
        if type_name == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a valid {type_name}") from None


def load_settings(path: Path | None, env: dict[str, str], overrides: dict) -> Settings:
    settings = Settings()
    if path is not None:
        try:
            with open(path, "rb") as fh:
                _apply(settings, tomllib.load(fh), str(path))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    from_env: dict = {}
    for key, value in env.items():
        if not key.startswith("KIYOT_") or key == "KIYOT_CONFIG":
            continue
        parts = key[len("KIYOT_"):].lower().split("_", 1)
        if parts[0] in ("local", "aws", "volumes") and len(parts) == 2:
            from_env.setdefault(parts[0], {})[parts[1]] = value
        else:
            from_env["_".join(parts)] = value
    _apply(settings, from_env, "environment")
    _apply(settings, {k: v for k, v in overrides.items() if v is not None}, "flags")
    settings.validate()
    return settings
