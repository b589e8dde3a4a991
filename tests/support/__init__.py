"""Shared test support: a local OCI registry and small deterministic test images.

- `tests.support.registry`: find or start Debian's `docker-registry` on 127.0.0.1:5000.
- `tests.support.images`: build busybox-based images in pure Python and push them.
"""
