"""The code version in provenance and cache keys tells edited code from the commit it started from."""

from __future__ import annotations

import subprocess

from storage.version import code_version, git_commit


def _git(root, *args) -> str:
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_uncommitted_changes_give_a_version_of_their_own(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "kernel.py").write_text("x = 1\n")
    _git(tmp_path, "add", "kernel.py")
    _git(tmp_path, "commit", "-q", "-m", "first")
    commit = _git(tmp_path, "rev-parse", "--short=12", "HEAD")
    assert git_commit(tmp_path) == commit
    (tmp_path / "kernel.py").write_text("x = 2\n")
    edited = git_commit(tmp_path)
    assert edited.startswith(commit + ".dirty") and len(edited) > len(commit + ".dirty")
    (tmp_path / "kernel.py").write_text("x = 3\n")
    assert git_commit(tmp_path) not in (edited, commit), "two different edits share a cache key"
    (tmp_path / "kernel.py").write_text("x = 1\n")
    assert git_commit(tmp_path) == commit


def test_outside_a_checkout_the_version_is_the_package_version(tmp_path):
    assert git_commit(tmp_path) is None
    assert code_version().startswith("mergeline ")
