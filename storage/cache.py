"""A local read-through cache of byte ranges, so a re-run of a merge downloads nothing twice.

Entries are keyed by (URI, file identity, byte range): a changed file has a new identity, so a
stale entry is never served, only evicted. Several processes may share one directory: entries
are written to a temp file and renamed into place, readers check the length, and a file evicted
under a reader is a miss. Eviction is least-recently-used (by mtime, bumped on every hit).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path

from storage.uri import FileIdentity

_TMP_PREFIX = ".tmp-"
_STALE_TMP_S = 3600
_shared: dict[tuple[int, str, int], ReadCache] = {}
_shared_lock = threading.Lock()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes_downloaded: int = 0  # fetched from the source on a miss
    bytes_from_cache: int = 0
    evictions: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


class ReadCache:
    """Bounded on-disk cache of byte ranges; thread- and process-safe."""

    def __init__(self, directory: str | Path, max_bytes: int):
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._size = self._scan()[0]

    @classmethod
    def from_env(cls) -> ReadCache | None:
        """MERGELINE_CACHE_DIR (unset: no cache) and MERGELINE_CACHE_MAX_GB (default 50)."""
        directory = os.environ.get("MERGELINE_CACHE_DIR")
        if not directory:
            return None
        return shared_cache(directory, int(float(os.environ.get("MERGELINE_CACHE_MAX_GB", "50")) * 1e9))

    def __reduce__(self):
        """A cache travels to another process (a Dask worker, with the checkpoints of a task) as its
        directory and bound, and becomes that process's shared cache there."""
        return shared_cache, (str(self.directory.absolute()), self.max_bytes)

    def _path(self, ident: FileIdentity, start: int, end: int) -> Path:
        key = json.dumps([ident.uri, ident.size, ident.etag, ident.version_id, start, end])
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.directory / digest[:2] / digest

    def get_into(self, ident: FileIdentity, start: int, out: memoryview) -> bool:
        """Fill out from the cache; False (a miss) if the entry is absent, evicted or the wrong length."""
        path = self._path(ident, start, start + len(out))
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size != len(out) or f.readinto(out) != len(out):
                    return False
        except FileNotFoundError:
            return False
        with contextlib.suppress(OSError):  # evicted meanwhile: the data read is still good
            os.utime(path)  # LRU: a hit makes the entry young again
        self.stats.add(hits=1, bytes_from_cache=len(out))
        return True

    def put(self, ident: FileIdentity, start: int, data: memoryview) -> int:
        """Store a range just downloaded (temp file + rename: readers never see a partial entry);
        returns how many entries were evicted to make room."""
        path = self._path(ident, start, start + len(data))
        path.parent.mkdir(exist_ok=True)
        tmp = path.parent / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            with_missing_ok(tmp)
            return 0  # a full disk makes the cache useless, not the read wrong
        with self._lock:
            self._size += len(data)
            over = self._size > self.max_bytes
        return self.evict() if over else 0

    def record_miss(self, nbytes: int) -> None:
        self.stats.add(misses=1, bytes_downloaded=nbytes)

    def tally(self) -> Tally:
        """This cache, with a count of its own: what one merge task read through it. The cache's
        stats are the process's, which tasks running side by side share."""
        return Tally(self)

    def _scan(self) -> tuple[int, list[tuple[float, int, Path]]]:
        total, entries, now = 0, [], time.time()
        for sub in self.directory.iterdir() if self.directory.exists() else []:
            if not sub.is_dir():
                continue
            for p in sub.iterdir():
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                if p.name.startswith(_TMP_PREFIX):
                    if now - st.st_mtime > _STALE_TMP_S:  # left by a killed process
                        with_missing_ok(p)
                    continue
                total += st.st_size
                entries.append((st.st_mtime, st.st_size, p))
        return total, entries

    def evict(self) -> int:
        """Drop least-recently-used entries until the cache is at 90% of its bound; how many."""
        with self._lock:
            total, entries = self._scan()
            entries.sort()
            target = int(self.max_bytes * 0.9)
            removed = 0
            for _, size, p in entries:
                if total <= target:
                    break
                with_missing_ok(p)
                total -= size
                removed += 1
            self._size = total
        self.stats.add(evictions=removed)
        return removed

    def size_bytes(self) -> int:
        return self._scan()[0]


class Tally:
    """A ReadCache's reads (see ReadCache.tally), counted in `stats` as well as in the cache's."""

    def __init__(self, cache: ReadCache):
        self.cache, self.stats = cache, CacheStats()

    def get_into(self, ident: FileIdentity, start: int, out: memoryview) -> bool:
        hit = self.cache.get_into(ident, start, out)
        if hit:
            self.stats.add(hits=1, bytes_from_cache=len(out))
        return hit

    def record_miss(self, nbytes: int) -> None:
        self.cache.record_miss(nbytes)
        self.stats.add(misses=1, bytes_downloaded=nbytes)

    def put(self, ident: FileIdentity, start: int, data: memoryview) -> int:
        evicted = self.cache.put(ident, start, data)
        self.stats.add(evictions=evicted)
        return evicted


def shared_cache(directory: str | Path, max_bytes: int) -> ReadCache:
    """This process's one cache for a directory and bound: its threads share the size count and
    the stats, and the directory is scanned once, not per task. A module-level function, so that
    pickles (cloudpickle's too) name it instead of copying it with its registry."""
    key = (os.getpid(), str(Path(directory).absolute()), int(max_bytes))
    with _shared_lock:
        if key not in _shared:
            _shared[key] = ReadCache(directory, max_bytes)
        return _shared[key]


def with_missing_ok(path: Path) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
