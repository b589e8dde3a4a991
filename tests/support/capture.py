"""A tiny packet capture (no tcpdump on these machines): TCP payloads seen on one interface.

    nsenter --net=/run/netns/X python capture.py eth0 OUT --seconds 20

Prints "ready" once the socket is bound, then writes one JSON line per TCP segment with a
payload ({"src", "dst", "sport", "dport", "payload" (hex)}) to OUT until the time is up,
SIGTERM, or 20000 segments: bounded either way.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003
MAX_SEGMENTS = 20000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("interface")
    ap.add_argument("out")
    ap.add_argument("--seconds", type=float, default=20.0)
    ns = ap.parse_args()
    stop = False

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((ns.interface, 0))
    sock.settimeout(0.2)
    print("ready", flush=True)
    deadline = time.monotonic() + ns.seconds
    seen = 0
    with open(ns.out, "w") as out:
        while not stop and time.monotonic() < deadline and seen < MAX_SEGMENTS:
            try:
                frame = sock.recv(65535)
            except TimeoutError:
                continue
            if len(frame) < 34 or frame[12:14] != b"\x08\x00":  # IPv4 only: cells have no v6 route
                continue
            ip = frame[14:]
            ihl = (ip[0] & 0x0F) * 4
            if ip[9] != 6:  # TCP
                continue
            total = struct.unpack("!H", ip[2:4])[0]
            tcp = ip[ihl:total]
            if len(tcp) < 20:
                continue
            sport, dport = struct.unpack("!HH", tcp[:4])
            payload = tcp[(tcp[12] >> 4) * 4:]
            if not payload:
                continue
            seen += 1
            out.write(json.dumps({"src": socket.inet_ntoa(ip[12:16]), "dst": socket.inet_ntoa(ip[16:20]),
                                  "sport": sport, "dport": dport, "payload": payload.hex()}) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
