"""Platforms and architectures, keyed by GOARCH: the one table the node uses.

A cell reports its architecture as GOARCH (`kiyot_py.model.CellFacts`); image indexes
name platforms the same way, and seccomp profiles name libseccomp's SCMP_ARCH_* and
moby's arch words. The node never asks its own machine: an arm64 cell behind an amd64
node gets arm64 everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiyot_py.model import CellFacts


@dataclass(frozen=True)
class Arch:
    goarch: str
    seccomp: str  # SCMP_ARCH_* of the native architecture
    sub_arches: tuple[str, ...]  # what a native filter also covers (moby archMap)
    moby: str  # the word moby profiles use in includes/excludes "arches"
    default_variant: str = ""


ARCHES: dict[str, Arch] = {
    a.goarch: a
    for a in (
        Arch("amd64", "SCMP_ARCH_X86_64", ("SCMP_ARCH_X86", "SCMP_ARCH_X32"), "amd64"),
        Arch("arm64", "SCMP_ARCH_AARCH64", ("SCMP_ARCH_ARM",), "arm64", "v8"),
        Arch("arm", "SCMP_ARCH_ARM", (), "arm", "v7"),
        Arch("386", "SCMP_ARCH_X86", (), "x86"),
        Arch("ppc64le", "SCMP_ARCH_PPC64LE", ("SCMP_ARCH_PPC64", "SCMP_ARCH_PPC"), "ppc64le"),
        Arch("s390x", "SCMP_ARCH_S390X", ("SCMP_ARCH_S390",), "s390x"),
        Arch("riscv64", "SCMP_ARCH_RISCV64", (), "riscv64"),
        Arch("mips64", "SCMP_ARCH_MIPS64", (), "mips64"),
        Arch("loong64", "SCMP_ARCH_LOONGARCH64", (), "loong64"),
    )
}

# Other spellings of a GOARCH (uname -m, Docker's), as containerd normalizes them.
_ALIASES = {
    "x86_64": "amd64",
    "x86-64": "amd64",
    "aarch64": "arm64",
    "i386": "386",
    "i686": "386",
    "armhf": "arm",
    "armel": "arm",
    "armv7l": "arm",
    "armv6l": "arm",
    "loongarch64": "loong64",
}
_ALIAS_VARIANT = {"armv7l": "v7", "armv6l": "v6", "armhf": "v7", "armel": "v6"}


def normalize_arch(architecture: str, variant: str = "") -> tuple[str, str]:
    """(GOARCH, variant) with the default variant filled in: ("aarch64", "") → ("arm64", "v8")."""
    raw = architecture.strip().lower()
    goarch = _ALIASES.get(raw, raw)
    variant = variant.strip().lower() or _ALIAS_VARIANT.get(raw, "")
    if variant and not variant.startswith("v") and variant.isdigit():
        variant = "v" + variant  # "8" → "v8", as containerd reads GOARM
    if not variant and goarch in ARCHES:
        variant = ARCHES[goarch].default_variant
    return goarch, variant


def arch(goarch: str) -> Arch:
    """The table entry of a GOARCH; an unknown one gets SCMP_ARCH_<GOARCH> and no sub-arches."""
    goarch, _ = normalize_arch(goarch)
    found = ARCHES.get(goarch)
    if found is not None:
        return found
    return Arch(goarch, "SCMP_ARCH_" + goarch.upper(), (), goarch)


@dataclass(frozen=True)
class Platform:
    """An image platform: ``str()`` is "linux/arm64/v8" (no trailing "/" without a variant)."""

    os: str = "linux"
    architecture: str = "amd64"  # GOARCH
    variant: str = ""

    def __post_init__(self) -> None:
        goarch, variant = normalize_arch(self.architecture, self.variant)
        object.__setattr__(self, "os", (self.os or "linux").strip().lower())
        object.__setattr__(self, "architecture", goarch)
        object.__setattr__(self, "variant", variant)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    @classmethod
    def parse(cls, text: str) -> Platform:
        """"linux/arm64", "linux/arm64/v8" or "arm64" (os linux)."""
        parts = text.strip().split("/")
        if not 1 <= len(parts) <= 3 or not all(parts):
            raise ValueError(f"invalid platform {text!r}: want os/arch[/variant]")
        if len(parts) == 1:
            return cls("linux", parts[0])
        return cls(*parts)

    @classmethod
    def from_facts(cls, facts: CellFacts) -> Platform:
        return cls(facts.os, facts.architecture, facts.variant)

    @classmethod
    def from_image_config(cls, config: dict[str, Any]) -> Platform | None:
        """The platform an image config blob declares, or None when it names no architecture."""
        architecture = config.get("architecture")
        if not isinstance(architecture, str) or not architecture:
            return None
        os_name, variant = config.get("os"), config.get("variant")
        return cls(os_name if isinstance(os_name, str) and os_name else "linux", architecture,
                   variant if isinstance(variant, str) else "")

    def matches(self, other: Platform) -> bool:
        """Same os and architecture, and the variants agree (an empty one matches any)."""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        return not self.variant or not other.variant or self.variant == other.variant
