"""kiyot-py: a CRI runtime in which every pod is its own VM (a "cell")."""

__version__ = "0.1.0"
