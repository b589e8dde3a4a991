"""Errors of the registry package. Messages never carry credentials."""

from __future__ import annotations


class RegistryError(Exception):
    """A registry refused or failed; the message has the registry's own words and the endpoint."""


class ImageNotFound(RegistryError):
    """The registry has no such manifest (404 MANIFEST_UNKNOWN / NAME_UNKNOWN), or no
    manifest for this platform in an index."""


class RegistryBlocked(RegistryError):
    """registries.conf blocks pulls from this registry (or namespace)."""


class RegistriesConfigError(ValueError):
    """A registries.conf file that cannot be used; the message names the file and the entry."""


class PlatformNotFound(ImageNotFound):
    """The image exists, but its index has no manifest for the platform asked for."""
