"""gpart's own version, and the oldest dependency versions gpart works with, checked when `gpart_cli` is imported.

pip installs what pyproject.toml allows, but a user's environment may hold older packages (a conda base, a pinned
image). Rather than fail deep inside a training run with an AttributeError, importing gpart names the package, the
version found, the version needed and why. pyproject.toml's floors are these (a test keeps them equal).
"""

from __future__ import annotations

import re
from importlib import metadata

__version__ = "0.1.0"  # pyproject.toml's version (tests/test_versions.py keeps them equal)

# package -> (oldest version, what gpart calls that needs it)
MINIMUM = {
    "torch": ("2.4", "torch.get_autocast_dtype and torch.is_autocast_enabled(device_type) in the GPart layer"),
    "transformers": ("4.56", "from_pretrained(dtype=...) (older versions only take torch_dtype)"),
    "peft": ("0.20", "UniLoraConfig (method unilora); LoRA would work with older versions"),
    "datasets": ("2.19", "hub and local loading through one load_dataset path, Image/ClassLabel features"),
    "safetensors": ("0.4.3", "safe_open metadata for the .gpart artifact and checkpoints"),
    "accelerate": ("0.30", "device_map loading straight onto the GPU"),
}


class OutdatedDependency(ImportError):
    """An installed dependency is older than gpart needs (the message names it, the version and the fix)."""


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: "2.4.0+cu121" -> (2, 4, 0), "4.56.0.dev0" -> (4, 56, 0)."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(p) for p in match.group().split(".")) if match else ()


def problems(installed=metadata.version) -> list[str]:
    """One message per dependency that is present but older than `MINIMUM` (absent ones fail their own import)."""
    found = []
    for package, (minimum, why) in MINIMUM.items():
        try:
            version = installed(package)
        except metadata.PackageNotFoundError:
            continue
        if release(version) < release(minimum):
            found.append(f"{package} {version} is installed but gpart needs {package}>={minimum} ({why}); "
                         f"upgrade it: pip install -U '{package}>={minimum}'")
    return found


def require(installed=metadata.version) -> None:
    """Raise `OutdatedDependency` listing every dependency below its floor."""
    found = problems(installed)
    if found:
        raise OutdatedDependency("gpart cannot run with these packages:\n  " + "\n  ".join(found))
