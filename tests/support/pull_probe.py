"""Run inside a cell's network namespace: what the node's pull path answers from there.

    python pull_probe.py <pull-path host:port> <tls-dir or -> <path> [<path> ...]

With `-`, no client certificate (what a pod's container has); else the cell.crt/cell.key
in that directory (the cell's own identity). Prints one JSON object: path → status (or
"tls: <error>" when no TLS session came up).
"""

from __future__ import annotations

import http.client
import json
import ssl
import sys


def main() -> None:
    address, tls_dir, *paths = sys.argv[1:]
    host, port = address.rsplit(":", 1)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # a pod does not know the node's CA; it still gets nothing
    if tls_dir != "-":
        ctx.load_cert_chain(f"{tls_dir}/cell.crt", f"{tls_dir}/cell.key")
    out: dict[str, object] = {}
    for path in paths:
        conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            out[path] = resp.status if b"SECRET" not in body else "SECRET"
        except (ssl.SSLError, ConnectionError) as exc:
            out[path] = f"tls: {exc.__class__.__name__}"
        finally:
            conn.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
