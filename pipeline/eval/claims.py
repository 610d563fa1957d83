"""Claims: "I am evaluating this checkpoint" — so that two evaluation jobs never do the same work.

A claim is a small JSON file (owner, expiry) in a claims location every job sees: a shared
directory (created with O_CREAT|O_EXCL) or an s3:// prefix (PUT with `If-None-Match: *`, S3's
conditional write: AWS since 2024, MinIO, moto). MLflow cannot do this: a tag is set
whatever was there, so "set if absent" would be read-then-write, a race.

Files are `<location>/<key>/claim-<generation>.json`. The owner of a key is whoever created
its highest generation, which only one creator can do. A crashed owner stops refreshing its
expiry (a heartbeat thread rewrites it every ttl/4); once expired, anyone may take over by
creating the next generation. Because a creator might race a release (or another taker), it
checks after creating that its generation is still the highest and backs off otherwise.
Release deletes the owner's generation (and older leftovers).

The claim only prevents double work; correctness of results does not depend on it: the
evaluation job re-reads MLflow after claiming and publishes a result only once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from pipeline.data import storage
from pipeline.errors import GapmError

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 900.0
CLAIM_PREFIX, CLAIM_SUFFIX = "claim-", ".json"


class ClaimError(GapmError):
    """The claims location cannot be used; the message says which and what to do."""


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class ClaimInfo:
    owner: str
    expires: float
    acquired: float

    @classmethod
    def parse(cls, data: bytes) -> "ClaimInfo | None":
        try:
            values = json.loads(data)
            return cls(owner=str(values["owner"]), expires=float(values["expires"]), acquired=float(values["acquired"]))
        except (ValueError, KeyError, TypeError):
            return None  # being written right now (local create, then write)


class Claim:
    """A held claim; `release()` (or the context manager) gives it up."""

    def __init__(self, store: "ClaimStore", key: str, generation: int, acquired: float):
        self.store, self.key, self.generation, self.acquired = store, key, generation, acquired
        self.lost = False
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.store.generation_url(self.key, self.generation)

    def refresh(self) -> bool:
        """Extends the expiry; False (and `lost`) if someone took the claim over."""
        if self.store.generations(self.key)[-1:] != [self.generation]:
            self.lost = True
            return False
        storage.write_bytes(self.url, self.store.payload(self.acquired))
        return True

    def start_heartbeat(self) -> None:
        interval = max(self.store.ttl_s / 4, 0.05)

        def beat() -> None:
            while not self._stop.wait(interval):
                try:
                    if not self.refresh():
                        log.warning("claim %s was taken over (this job was too slow to refresh it); "
                                    "finishing anyway, the result is published once", self.key)
                        return
                except Exception as error:  # noqa: BLE001 - a missed beat is retried
                    log.warning("could not refresh claim %s: %s", self.key, error)

        self._heartbeat = threading.Thread(target=beat, name=f"claim-{self.key}", daemon=True)
        self._heartbeat.start()

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        for generation in self.store.generations(self.key):
            if generation <= self.generation:
                storage.delete(self.store.generation_url(self.key, generation))
        self.store.remove_empty_directories(self.key)

    def __enter__(self) -> "Claim":
        self.start_heartbeat()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ClaimStore:
    def __init__(self, location: str, ttl_s: float = DEFAULT_TTL_S, owner: str | None = None):
        self.location = location.rstrip("/") if storage.is_s3_url(location) else location
        self.ttl_s = ttl_s
        self.owner = owner or owner_id()

    def generation_url(self, key: str, generation: int) -> str:
        return storage.join_url(self.location, f"{key}/{CLAIM_PREFIX}{generation:08d}{CLAIM_SUFFIX}")

    def generations(self, key: str) -> list[int]:
        found = []
        for url in storage.list_urls(storage.join_url(self.location, key), suffix=CLAIM_SUFFIX):
            name = url.rsplit("/", 1)[-1]
            if name.startswith(CLAIM_PREFIX) and name[len(CLAIM_PREFIX):-len(CLAIM_SUFFIX)].isdigit():
                found.append(int(name[len(CLAIM_PREFIX):-len(CLAIM_SUFFIX)]))
        return sorted(found)

    def remove_empty_directories(self, key: str) -> None:
        """Local claims leave directories behind; S3 has no directories."""
        if storage.is_s3_url(self.location):
            return
        root = os.path.abspath(storage.local_path(self.location))
        directory = os.path.abspath(storage.local_path(storage.join_url(self.location, key)))
        while directory.startswith(root + os.sep):
            try:
                os.rmdir(directory)
            except OSError:
                return  # not empty (another claim) or already gone
            directory = os.path.dirname(directory)

    def payload(self, acquired: float) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "acquired": acquired, "expires": now + self.ttl_s,
                           "refreshed": now}).encode()

    def holder(self, key: str) -> ClaimInfo | None:
        """The live claim on `key`, if any."""
        generations = self.generations(key)
        if not generations:
            return None
        try:
            info = ClaimInfo.parse(storage.read_bytes(self.generation_url(key, generations[-1])))
        except storage.StorageError:
            return None  # released meanwhile
        if info is None:
            return ClaimInfo(owner="?", expires=time.time() + self.ttl_s, acquired=time.time())
        return info if info.expires > time.time() else None

    def try_acquire(self, key: str) -> Claim | None:
        generations = self.generations(key)
        generation = 0
        if generations:
            top = generations[-1]
            try:
                info = ClaimInfo.parse(storage.read_bytes(self.generation_url(key, top)))
                if info is None or info.expires > time.time():
                    return None  # held (or being created this instant)
                log.warning("claim %s of %s expired %.0fs ago (a crashed job?); taking it over", key, info.owner,
                            time.time() - info.expires)
            except storage.StorageError:
                pass  # released between listing and reading
            generation = top + 1
        acquired = time.time()
        if not storage.create_exclusive(self.generation_url(key, generation), self.payload(acquired)):
            return None
        if self.generations(key)[-1] != generation:  # lost a race with a newer generation
            storage.delete(self.generation_url(key, generation))
            return None
        for older in generations:
            if older < generation:
                storage.delete(self.generation_url(key, older))
        return Claim(self, key, generation, acquired)

    def acquire(self, key: str, wait_s: float, poll_s: float = 0.5) -> Claim | None:
        """Like try_acquire, waiting up to `wait_s` for a held claim to be released."""
        deadline = time.monotonic() + wait_s
        while True:
            claim = self.try_acquire(key)
            if claim is not None or time.monotonic() >= deadline:
                return claim
            time.sleep(poll_s)
