"""Cell providers: one module per place cells come from."""

from kiyot_py.providers.base import Provider, ProviderError

__all__ = ["Provider", "ProviderError"]
