"""Cell providers: one module per place cells come from."""

from __future__ import annotations

from pathlib import Path

from kiyot_py.config import ConfigError, Settings
from kiyot_py.pki import NodePKI
from kiyot_py.providers.base import Provider, ProviderError


def make_provider(settings: Settings, pki: NodePKI, shared_images: Path | None = None) -> Provider:
    """The provider the settings name; its cells get identities from `pki`, and a local
    cell the node's own unpacked images from `shared_images` (pods/shared_images.py)."""
    if settings.provider == "local":
        from kiyot_py.providers.local import LocalProvider
        return LocalProvider(settings.state_dir, settings.local, pki, shared_images)
    if settings.provider == "aws":
        from kiyot_py.providers.ec2 import Ec2Provider
        return Ec2Provider(settings.aws, pki, settings.node_name)
    raise ConfigError(f"provider {settings.provider!r} is not available (only 'local' and 'aws')")


__all__ = ["Provider", "ProviderError", "make_provider"]
