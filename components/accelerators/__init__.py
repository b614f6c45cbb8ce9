"""Accelerator profiles: every fact that differs between device kinds, in one place per kind.

A profile says what a node container needs to see its devices (devices, groups, capabilities, mounts,
env), what the preflight checks on a host before anything runs there (with the fix for each failure),
how many GPUs a node may declare, which executor a layout uses, and which recipe builds its image.
Adding a kind of device is one module here (and its recipe under images/), registered in PROFILES.
"""

from components.accelerators import cpu, dcu
from components.accelerators.profile import HostPath, Profile

PROFILES: dict[str, Profile] = {profile.name: profile for profile in (dcu.PROFILE, cpu.PROFILE)}

__all__ = ["PROFILES", "HostPath", "Profile"]
