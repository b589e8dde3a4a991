"""Where moto 5.2 falls short of EC2, the simulator keeps EC2's rules itself.

Installed into moto's EC2 backend in this process (the server runs in a thread of the
simulator), so that what a client sees over HTTP is what EC2 would answer:

- `ClientToken`: the same token with the same parameters gives the same reservation;
  with other parameters, `IdempotentParameterMismatch` (moto launches again).
- An instance is `pending` until its cell is built (after the boot delay), not running at once.
- An unknown AMI is `InvalidAMIID.NotFound` (moto may launch it).
- No public address, and no launch outside the simulator's own subnets (moto hands out
  addresses of real AWS ranges and random 10.x ones): nothing here ever points off the machine.
- `GetConsoleOutput` gives the instance's real console (moto: a fixed text).
- `SecondaryPrivateIpAddressCount` at launch gives that many more free addresses of the
  subnet (moto gives none).
- Capacity runs out where a test says so: a launch into a (type, zone, market) with a
  capacity fault fails with EC2's code and words, and every launch attempt is counted.
- `DescribeSpotPriceHistory` answers from the simulator's price table (moto: one flat
  price for every type), and a stop or a termination is announced as EventBridge would.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Callable
from typing import Any, Protocol

from moto.core.utils import utcnow
from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models import EC2Backend
from moto.ec2.models.instances import Instance, InstanceState
from moto.ec2.responses.general import General

CONSOLE_MAX = 64 * 1024  # EC2 returns the last 64 KiB


class Simulation(Protocol):
    """What the gaps need of the simulator: its subnets, and hooks into its cells."""

    subnet_ids: frozenset[str]

    def launched(self, instances: list[Instance]) -> None: ...

    def ended(self, instance_ids: list[str]) -> None: ...

    def console(self, instance_id: str) -> bytes: ...

    def tokens_expired(self) -> bool:
        """Whether client tokens seen so far count as expired (a test's knob)."""
        ...

    def attempt(self, instance_type: str, zone: str, market: str) -> tuple[str, str] | None:
        """Count a launch attempt; (code, message) when a capacity fault refuses it."""
        ...

    def spot_price(self, instance_type: str, zone: str) -> float | None: ...

    def state_changed(self, instance_ids: list[str], states: tuple[str, ...]) -> None:
        """Tell EventBridge's targets (the instances went through these states)."""
        ...


_tokens: dict[tuple[str, str, str], tuple[str, str]] = {}  # (account, region, token) -> (params, reservation)
_lock = threading.Lock()  # moto's server answers each request in a thread of its own


def _fingerprint(image_id: str, count: int, user_data: Any, groups: list[str], kwargs: dict[str, Any]) -> str:
    params = {k: v for k, v in kwargs.items() if k not in ("client_token", "region_name")}
    doc = json.dumps([image_id, count, str(user_data), groups, params], sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()


def _subnets_of(kwargs: dict[str, Any]) -> list[str]:
    named = [kwargs["subnet_id"]] if kwargs.get("subnet_id") else []
    return named + [n["SubnetId"] for n in kwargs.get("nics") or [] if n.get("SubnetId")]


def install(sim: Simulation, run: Callable[..., Any] = EC2Backend.run_instances,
            terminate: Callable[..., Any] = EC2Backend.terminate_instances,
            stop: Callable[..., Any] = EC2Backend.stop_instances) -> None:
    def run_instances(self: EC2Backend, image_id: str, count: int, user_data: Any, security_group_names: list[str],
                      **kwargs: Any) -> Any:
        self.describe_images(ami_ids=[image_id])  # InvalidAMIID.NotFound, as EC2 answers
        subnets = _subnets_of(kwargs)
        if not subnets or not set(subnets) <= sim.subnet_ids:
            raise EC2ClientError(
                "InvalidParameterValue",
                f"the simulator launches only into its own subnets ({', '.join(sorted(sim.subnet_ids))}); "
                f"asked for {', '.join(subnets) or 'none'}")
        zone = self.get_subnet(subnets[0]).availability_zone
        market = "spot" if kwargs.get("instance_market_options") == "spot" else "on-demand"
        refused = sim.attempt(kwargs.get("instance_type") or "m1.small", zone, market)
        if refused is not None:
            raise EC2ClientError(*refused)
        kwargs["associate_public_ip"] = False
        for nic in kwargs.get("nics") or []:
            nic["AssociatePublicIpAddress"] = False
        token = kwargs.get("client_token") or ""
        key = (self.account_id, self.region_name, token)
        params = _fingerprint(image_id, count, user_data, security_group_names, kwargs)
        with _lock:
            if token and key in _tokens and not sim.tokens_expired():
                seen, reservation_id = _tokens[key]
                if seen != params:
                    raise EC2ClientError(
                        "IdempotentParameterMismatch",
                        "The client token you have provided is associated with a resource that is already "
                        "deleted or has different parameters. Please use a different client token.")
                return self.reservations[reservation_id]
            reservation = run(self, image_id, count, user_data, security_group_names, **kwargs)
            wanted = {int(n.get("DeviceIndex", 0)): int(n.get("SecondaryPrivateIpAddressCount") or 0)
                      for n in kwargs.get("nics") or []}
            for instance in reservation.instances:
                instance._state = InstanceState("pending", 0)
                for index, nic in instance.nics.items():
                    nic.public_ip = None
                    nic.public_ip_auto_assign = False
                    # moto takes SecondaryPrivateIpAddressCount and assigns nothing (or, by
                    # other calls, random addresses that may be in use): from the subnet's free ones.
                    nic.private_ip_addresses.extend(
                        {"Primary": False, "PrivateIpAddress": nic.subnet.get_available_subnet_ip(instance)}
                        for _ in range(wanted.get(int(index), 0)))
            if token:
                _tokens[key] = (params, reservation.id)
        sim.launched(list(reservation.instances))
        return reservation

    def terminate_instances(self: EC2Backend, instance_ids: list[str]) -> Any:
        result = terminate(self, instance_ids)
        changed = [instance.id for instance, before in result if before.name != "terminated"]
        sim.ended([instance.id for instance, _ in result])
        sim.state_changed(changed, ("shutting-down", "terminated"))
        return result

    def stop_instances(self: EC2Backend, instance_ids: list[str]) -> Any:
        result = stop(self, instance_ids)
        changed = [instance.id for instance, before in result if before.name not in ("stopping", "stopped")]
        sim.ended([instance.id for instance, _ in result])  # a stopped VM runs nothing
        sim.state_changed(changed, ("stopping", "stopped"))
        return result

    def describe_spot_price_history(self: Any) -> Any:
        from moto.core.responses import ActionResult

        wanted = set(self._get_param("InstanceTypes", []))
        filters = self._filters_from_querystring()
        zones = set(filters.get("availability-zone", []))
        now = utcnow()
        history = []
        for offering in self.ec2_backend.describe_spot_price_history(list(wanted) or None, {}):
            name, zone = offering["InstanceType"], offering["Location"]
            price = sim.spot_price(name, zone)
            if price is None or (zones and zone not in zones):
                continue
            history.append({"InstanceType": name, "ProductDescription": "Linux/UNIX", "SpotPrice": f"{price:.6f}",
                            "AvailabilityZone": zone, "Timestamp": now})
        return ActionResult({"SpotPriceHistory": history})

    def get_console_output(self: General) -> Any:
        from moto.core.responses import ActionResult

        instance = self.ec2_backend.get_instance(self._get_param("InstanceId"))
        output = sim.console(instance.id)[-CONSOLE_MAX:]
        return ActionResult({"InstanceId": instance.id, "Timestamp": utcnow(),
                             "Output": base64.b64encode(output).decode()})

    EC2Backend.run_instances = run_instances  # type: ignore[method-assign, assignment]
    EC2Backend.terminate_instances = terminate_instances  # type: ignore[method-assign, assignment]
    EC2Backend.stop_instances = stop_instances  # type: ignore[method-assign, assignment]
    General.get_console_output = get_console_output  # type: ignore[method-assign]
    from moto.ec2.responses.spot_instances import SpotInstances

    SpotInstances.describe_spot_price_history = describe_spot_price_history  # type: ignore[method-assign]
