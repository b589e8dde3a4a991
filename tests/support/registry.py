"""A local OCI registry for the tests: Debian's `docker-registry` on 127.0.0.1:5000.

`scripts/test.sh` starts one for the whole run; the `registry` fixture uses whatever
answers at 127.0.0.1:5000/v2/ and otherwise starts one of its own.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

REGISTRY = "127.0.0.1:5000"


class RegistryError(RuntimeError):
    pass


def v2_up(addr: str = REGISTRY, timeout: float = 2.0) -> bool:
    """True when `GET http://ADDR/v2/` answers 200 (or 401: a registry with auth)."""
    try:
        with urllib.request.urlopen(f"http://{addr}/v2/", timeout=timeout) as r:
            return r.status == 200
    except urllib.error.HTTPError as e:
        return e.code == 401
    except (OSError, urllib.error.URLError):
        return False


def _answers(addr: str) -> bool:
    """Whether anything HTTP answers at ADDR (a registry that wants auth says 401)."""
    try:
        urllib.request.urlopen(f"http://{addr}/v2/", timeout=1)
        return True
    except urllib.error.HTTPError:
        return True
    except (OSError, urllib.error.URLError):
        return False


def config_text(root: Path, addr: str = REGISTRY, htpasswd: Path | None = None) -> str:
    """A docker-registry config: filesystem storage under ROOT/data, plain HTTP on ADDR;
    with `htpasswd`, Basic auth against that file."""
    auth = f"auth:\n  htpasswd:\n    realm: kiyot-tests\n    path: {htpasswd}\n" if htpasswd else ""
    return (
        "version: 0.1\n" + auth +
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        "storage:\n"
        f"  filesystem:\n    rootdirectory: {root / 'data'}\n"
        "  delete:\n    enabled: true\n"
        "  cache:\n    blobdescriptor: inmemory\n"
        f"http:\n  addr: {addr}\n"
    )


def start_registry(root: Path, addr: str = REGISTRY, timeout: float = 15.0,
                   user: tuple[str, str] | None = None) -> subprocess.Popen:
    """Start `docker-registry serve` with its config and storage under ROOT; wait for /v2/.
    With `user` (name, password), every request needs that user's Basic auth."""
    exe = shutil.which("docker-registry")
    if exe is None:
        raise RegistryError(
            "docker-registry is not installed and nothing answers at "
            f"http://{addr}/v2/: run `sudo bash scripts/setup.sh` (or `bash scripts/test.sh`)")
    root.mkdir(parents=True, exist_ok=True)
    conf = root / "config.yml"
    htpasswd = None
    if user is not None:
        with warnings.catch_warnings():  # deprecated in 3.11, gone in 3.13: then use the bcrypt package
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # bcrypt through libxcrypt: the one hash docker-registry's htpasswd takes

        htpasswd = root / "htpasswd"
        htpasswd.write_text(f"{user[0]}:{crypt.crypt(user[1], crypt.mksalt(crypt.METHOD_BLOWFISH))}\n")  # noqa: S324
    conf.write_text(config_text(root, addr, htpasswd))
    with open(root / "registry.log", "ab") as log:
        proc = subprocess.Popen([exe, "serve", str(conf)], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if v2_up(addr, timeout=1) or (user is not None and _answers(addr)):
            return proc
        if proc.poll() is not None:
            raise RegistryError(f"docker-registry exited ({proc.returncode}) at start:\n"
                                + (root / "registry.log").read_text()[-2000:])
        time.sleep(0.05)
    stop_registry(proc)
    raise RegistryError(f"docker-registry did not answer at http://{addr}/v2/ within {timeout}s:\n"
                        + (root / "registry.log").read_text()[-2000:])


def stop_registry(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
