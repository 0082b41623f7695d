"""OutputLock: one merge at a time per output, locally (flock) and on a real S3 endpoint (lease)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import boto3
import pytest

import storage
from storage import OutputLock, StorageError

# A holder in another process: takes the lock, says so, then on each line of stdin reports
# whether it still holds it, and releases on "release".
HOLDER = """
import sys
from storage import OutputLock
lock = OutputLock(sys.argv[1], purpose="holder-test").acquire()
print("held", flush=True)
for line in sys.stdin:
    try:
        lock.check()
        print("ok", flush=True)
    except Exception as e:
        print("lost:", e, flush=True)
    if line.strip() == "release":
        lock.release()
        print("released", flush=True)
        break
"""


def start_holder(uri: str, **env) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, uri], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, **env}, cwd=Path(__file__).parent.parent)
    assert proc.stdout.readline().strip() == "held"
    return proc


def ask(proc: subprocess.Popen, line: str = "check") -> str:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def output_uri(where: str, tmp_path: Path, bucket: str | None) -> str:
    return f"s3://{bucket}/models/merged" if where == "s3" else str(tmp_path / "models" / "merged")


@pytest.fixture(params=["local", "s3"])
def where(request):
    if request.param == "s3":
        request.getfixturevalue("s3_env")
    return request.param


def test_a_held_output_makes_the_next_run_wait_then_fail_naming_the_holder(where, request, tmp_path):
    bucket = request.getfixturevalue("bucket") if where == "s3" else None
    out = output_uri(where, tmp_path, bucket)
    holder = start_holder(out)
    try:
        told = []
        with pytest.raises(StorageError) as err:
            OutputLock(out, wait_s=0.8).acquire(on_wait=told.append)
        assert out in str(err.value) and f"pid {holder.pid}" in str(err.value) and "holder-test" in str(err.value)
        assert len(told) == 1 and f"pid {holder.pid}" in told[0]  # told once, not on every poll
        assert ask(holder, "release") == "ok" and holder.stdout.readline().strip() == "released"
        with OutputLock(out, wait_s=0) as lock:  # free at once after a release
            assert lock.held
    finally:
        holder.kill()
        holder.wait()
    if where == "local":  # nothing left beside the outputs
        assert not (tmp_path / "models" / storage.writer.STAGING_DIR).exists()
    else:
        listed = boto3.client("s3").list_objects_v2(Bucket=bucket).get("KeyCount", 0)
        assert listed == 0


def test_a_killed_holders_lock_is_taken_over(where, request, tmp_path):
    """Locally the kernel drops a dead process's flock at once; an S3 lease once it has gone
    unrenewed for the ttl (by the server's clock)."""
    bucket = request.getfixturevalue("bucket") if where == "s3" else None
    out = output_uri(where, tmp_path, bucket)
    holder = start_holder(out, MERGELINE_LOCK_TTL_S="60")  # no renewal during the test
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = OutputLock(out, wait_s=30, ttl_s=1).acquire()
    try:
        assert lock.held
        with pytest.raises(StorageError, match="being written by another merge"):
            OutputLock(out, wait_s=0.3, ttl_s=1).acquire()  # and the new holder's lock holds
    finally:
        lock.release()


def test_waiters_get_the_lock_in_turn(tmp_path):
    out = str(tmp_path / "merged")
    events: list[str] = []
    b_waiting = threading.Event()
    a = OutputLock(out).acquire()
    events.append("a acquired")

    def second():
        b = OutputLock(out).acquire(on_wait=lambda msg: (events.append("b waiting"), b_waiting.set()))
        events.append("b acquired")
        b.release()

    t = threading.Thread(target=second)
    t.start()
    assert b_waiting.wait(30)
    events.append("a released")
    a.release()
    t.join(30)
    assert events == ["a acquired", "b waiting", "a released", "b acquired"]


def test_a_renewed_s3_lease_is_never_taken_over(s3_env, bucket):
    out = f"s3://{bucket}/models/merged"
    # renewed every second; the S3 clock's whole seconds make an age look up to 1 s older
    with OutputLock(out, ttl_s=3):
        with pytest.raises(StorageError, match="being written by another merge"):
            OutputLock(out, wait_s=5, ttl_s=3).acquire()


def test_a_stalled_s3_holder_learns_it_lost_the_lease_and_leaves_the_new_one(s3_env, bucket):
    """A holder that stops renewing (here: stopped with SIGSTOP) past the ttl loses the lease to
    the next run; when it wakes, check() refuses to publish and release() deletes nothing."""
    out = f"s3://{bucket}/models/merged"
    holder = start_holder(out, MERGELINE_LOCK_TTL_S="1.5")
    try:
        holder.send_signal(signal.SIGSTOP)
        taker = OutputLock(out, wait_s=30, ttl_s=1.5).acquire()
        holder.send_signal(signal.SIGCONT)
        threading.Event().wait(1.5)  # the holder's next renewal finds the lease replaced
        assert ask(holder).startswith("lost:")
        assert ask(holder, "release").startswith("lost:") and holder.stdout.readline().strip() == "released"
        with pytest.raises(StorageError, match="being written by another merge"):
            OutputLock(out, wait_s=0.3, ttl_s=1.5).acquire()  # the taker's lease survived that release
        taker.check()
        taker.release()
    finally:
        holder.kill()
        holder.wait()


def test_a_holder_asks_s3_whether_it_still_holds_the_lease_before_cleaning_up(s3_env, bucket):
    """Between renewals `held` is what the last renewal saw; a failing run about to delete the
    shared staging area asks S3 (a run that took the lease over may be writing there)."""
    out = f"s3://{bucket}/models/merged"
    lock = OutputLock(out, wait_s=5, ttl_s=60).acquire()   # renewals 20 s apart: none in this test
    try:
        assert lock.still_held()
        key = lock.uri.removeprefix(f"s3://{bucket}/")
        boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=b'{"token": "the run that took it over"}')
        assert lock.held and not lock.still_held() and not lock.held
        with pytest.raises(StorageError, match="lost its lock"):
            lock.check()
    finally:
        lock.release()
    assert boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read() == b'{"token": "the run that took it over"}'


def test_bad_lock_settings_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGELINE_LOCK_WAIT_S", "soon")
    with pytest.raises(ValueError, match="MERGELINE_LOCK_WAIT_S='soon'"):
        OutputLock(str(tmp_path / "m"))
