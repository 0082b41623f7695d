"""One merge at a time per output: a lock held while a run stages and publishes it.

Runs that publish to the same output (a nightly run and one a newly landed expert started, say)
share its staging area, and an S3 publish is many copies: two runs at once could leave a model
whose shards came from different runs. So the merge flow holds its output's lock from before its
first staged shard to its publish (or abort), and a second run waits for it.

- Local outputs: flock on `<staging>.lock`, released by the kernel when the holder exits or dies.
- S3 outputs: a lease object `<staging>.lock`, created only if absent (If-None-Match: *), renewed
  by a background thread and deleted on release (both If-Match on its ETag). A lease left
  unrenewed for `ttl` seconds by the S3 server's own clock belongs to a holder that died: the
  next run replaces it, If-Match on the ETag it saw, so only one run can.

The lock file or object says who holds it (host, pid, what for, since when) for the waiting run's
messages. AWS S3, MinIO and R2 support these conditional requests.
"""

from __future__ import annotations

import contextlib
import email.utils
import fcntl
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from botocore.exceptions import BotoCoreError, ClientError

from storage import s3
from storage.errors import CheckpointError, StorageError
from storage.uri import is_s3, validate_output_uri
from storage.writer import staging_uri

DEFAULT_WAIT_S = 3600.0  # MERGELINE_LOCK_WAIT_S: how long a run waits for another to finish
DEFAULT_TTL_S = 60.0     # MERGELINE_LOCK_TTL_S: an S3 lease unrenewed this long is a dead holder's
_POLL_S = {"local": 0.25, "s3": 2.0}  # how often a waiting run looks again (an S3 look is a GET)


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise ValueError(f"{name}={raw!r} must not be negative")
    return value


class OutputLock:
    """The lock of one output URI. acquire() waits (up to wait_s) for another holder to finish;
    check() raises if an S3 lease was lost (this run stalled past its ttl and another took over),
    so a run never publishes, or cleans up, what it no longer owns; release() is idempotent."""

    def __init__(self, output_uri: str, *, purpose: str = "merge", wait_s: float | None = None,
                 ttl_s: float | None = None):
        self.output = validate_output_uri(output_uri)
        self.uri = staging_uri(self.output) + ".lock"
        self.wait_s = _env_seconds("MERGELINE_LOCK_WAIT_S", DEFAULT_WAIT_S) if wait_s is None else wait_s
        self.ttl_s = _env_seconds("MERGELINE_LOCK_TTL_S", DEFAULT_TTL_S) if ttl_s is None else ttl_s
        self._token = secrets.token_hex(8)
        self._about = {"host": socket.gethostname(), "pid": os.getpid(), "purpose": purpose, "token": self._token}
        self._fd: int | None = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.lost: str | None = None   # why an S3 lease was lost, once it was
        self.waited_s = 0.0

    @property
    def held(self) -> bool:
        return (self._fd is not None or self._etag is not None) and self.lost is None

    def acquire(self, on_wait: Callable[[str], None] | None = None) -> OutputLock:
        """Take the lock, waiting for a current holder; on_wait(message) is told who, once per holder."""
        t0 = time.monotonic()
        told: set[str] = set()

        def waiting(holder: dict) -> None:
            if time.monotonic() - t0 > self.wait_s:
                raise StorageError(
                    f"{self.output} is being written by another merge ({_describe(holder)}); gave up after "
                    f"{self.wait_s:g} s (MERGELINE_LOCK_WAIT_S)")
            if on_wait and holder.get("token") not in told:
                told.add(holder.get("token"))
                on_wait(f"waiting for {self.output}: another merge holds it ({_describe(holder)})")
            time.sleep(_POLL_S["s3" if is_s3(self.uri) else "local"])

        (self._acquire_s3 if is_s3(self.uri) else self._acquire_local)(waiting)
        self.waited_s = time.monotonic() - t0
        return self

    def check(self) -> None:
        if self.lost:
            raise StorageError(f"{self.output}: lost its lock ({self.lost}); not publishing")

    def still_held(self) -> bool:
        """`held`, asked of S3 now rather than as of the last renewal: before a failed run deletes
        the shared staging area, which a run that took the lease over may be writing into. (A
        renewal between the HEAD and the comparison reads as lost: staging is then left, not lost.)"""
        if not self.held or self._etag is None:
            return self.held
        try:
            _, etag, _ = s3.head(*s3.split_s3_uri(self.uri))
        except CheckpointError:
            etag = None
        if etag != self._etag.strip('"'):
            self.lost = self.lost or f"{self.uri} was replaced or removed while this run held it"
        return self.held

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.uri)  # before unlocking: a waiter that then wins sees the inode gone, retries
            os.close(self._fd)
            self._fd = None
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(self.uri))  # the shared staging folder, once nothing is left in it
        if self._etag is not None:
            self._stop.set()
            if self._renewer is not None:
                self._renewer.join()
            if self.lost is None:
                bucket, key = s3.split_s3_uri(self.uri)
                with contextlib.suppress(ClientError):  # 412: another run has it now; 404: gone already
                    s3.shared_client().delete_object(Bucket=bucket, Key=key, IfMatch=self._etag)
            self._etag = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- local: flock ----------------------------------------------------------------------------

    def _acquire_local(self, waiting) -> None:
        while True:
            os.makedirs(os.path.dirname(self.uri), exist_ok=True)
            try:
                fd = os.open(self.uri, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the last holder removed the emptied folder just now
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _parse(os.pread(fd, 4096, 0))
                os.close(fd)
                waiting(holder)
                continue
            try:
                current = os.stat(self.uri).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:  # not a file its last holder unlinked on release
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, _body(self._stamped()), 0)
        self._fd = fd

    # -- S3: a lease object ----------------------------------------------------------------------

    def _acquire_s3(self, waiting) -> None:
        bucket, key = s3.split_s3_uri(self.uri)
        client = s3.shared_client()
        while True:
            self._stamped()
            try:
                self._etag = client.put_object(Bucket=bucket, Key=key, Body=self._lease(), IfNoneMatch="*")["ETag"]
                break
            except ClientError as e:
                if _status(e) not in (409, 412):  # 409: a concurrent conditional write; look again
                    _raise(e, self.uri)
            try:
                obj = client.get_object(Bucket=bucket, Key=key)
                holder, etag = _parse(obj["Body"].read()), obj["ETag"]
            except ClientError as e:
                if _status(e) == 404:  # released meanwhile
                    continue
                _raise(e, self.uri)
            if holder.get("token") == self._token:  # our own put, whose reply was lost and retried
                self._etag = etag
                break
            if _server_age(obj) > self.ttl_s:  # its holder stopped renewing: take it over
                try:
                    self._etag = client.put_object(Bucket=bucket, Key=key, Body=self._lease(), IfMatch=etag)["ETag"]
                    break
                except ClientError as e:
                    if _status(e) not in (404, 409, 412):
                        _raise(e, self.uri)
                    continue
            waiting(holder)
        self._renewer = threading.Thread(target=self._renew, args=(bucket, key), name="mergeline-lock", daemon=True)
        self._renewer.start()

    def _stamped(self) -> dict:
        """Who holds it, since now (the moment of taking it)."""
        self._about["since"] = datetime.now(UTC).isoformat(timespec="seconds")
        return self._about

    def _lease(self) -> bytes:
        """The lease body; `renewed` changes its ETag on every renewal, so a takeover's If-Match
        on an old ETag fails while the holder is alive."""
        return _body({**self._about, "renewed": datetime.now(UTC).isoformat(timespec="milliseconds")})

    def _renew(self, bucket: str, key: str) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                etag = s3.shared_client().put_object(Bucket=bucket, Key=key, Body=self._lease(), IfMatch=self._etag)
                self._etag = etag["ETag"]
            except ClientError as e:
                if _status(e) in (404, 412):
                    self.lost = f"{self.uri} was replaced or removed while this run held it"
                    return
            except BotoCoreError:
                pass  # a network blip that outlasted botocore's retries: try again next period


def _status(e) -> int | None:
    return e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _raise(e, uri: str):
    with s3.errors_for(uri):
        raise e


def _server_age(obj: dict) -> float:
    """Seconds since the object was last written, by the S3 server's clock (its reply's Date)."""
    now = email.utils.parsedate_to_datetime(obj["ResponseMetadata"]["HTTPHeaders"]["date"])
    return (now - obj["LastModified"]).total_seconds()


def _body(about: dict) -> bytes:
    return (json.dumps(about, sort_keys=True) + "\n").encode()


def _parse(data: bytes) -> dict:
    try:
        about = json.loads(data)
    except ValueError:
        return {}
    return about if isinstance(about, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return (f"{holder.get('purpose', 'merge')} on {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"since {holder.get('since', '?')}")
