"""The code version recorded in provenance and cache keys: package version + git commit."""

from __future__ import annotations

import functools
import hashlib
import subprocess
from importlib import metadata
from pathlib import Path


@functools.cache
def code_version() -> str:
    """'mergeline 0.1.0+g<commit>[.dirty<hash>]' when run from a git checkout, else the package version."""
    try:
        version = metadata.version("mergeline")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    commit = git_commit(Path(__file__).resolve().parent.parent)
    return f"mergeline {version}+g{commit}" if commit else f"mergeline {version}"


def git_commit(root: Path) -> str | None:
    """The checkout's commit, plus '.dirty' and a hash of the uncommitted changes to tracked files:
    the version is part of every layer's cache key, so edited code must not reuse cached shards."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5,
                              check=True).stdout

    try:
        commit = git("rev-parse", "--short=12", "HEAD").strip()
    except (OSError, subprocess.SubprocessError):
        return None
    try:
        diff = git("diff", "HEAD", "--binary")
    except (OSError, subprocess.SubprocessError):  # changes that cannot be read: dirty, of no known content
        return f"{commit}.dirty"
    return f"{commit}.dirty{hashlib.sha256(diff.encode()).hexdigest()[:8]}" if diff else commit
