"""The code version recorded in provenance and cache keys: package version + git commit."""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path


@functools.cache
def code_version() -> str:
    """'mergeline 0.1.0+g<commit>[.dirty]' when run from a git checkout, else the package version."""
    try:
        version = metadata.version("mergeline")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"mergeline {version}"
    return f"mergeline {version}+g{commit}"
