"""A run owns its folder while it runs, and its config is the one it was started with.

Two processes training under one run name would overwrite each other's checkpoints and delete
them while pruning, so the driver holds a lease on `<storage>/<name>/` from its first write to
its last:
- on a local (or mounted) path, an exclusive `flock` on `<name>/.lease`: the kernel releases it
  when the holder exits, however it exits, so the successor of a killed run takes over at once;
- in object storage, `<name>/_lease.json`, written by conditional PUTs (If-None-Match to create
  it, If-Match on the ETag last seen to take over or renew it), so of two writers exactly one
  wins. A thread renews it every LEASE_TTL_S / 4 seconds; another process takes it over once it
  is LEASE_TTL_S old (or at once when its holder is a dead process on the same host). A holder
  whose renewal finds the lease changed has lost it: the run fails when the lease is released,
  saying so, rather than report success over a folder another run wrote into.
Either way the file names the holder (host, pid, start time), and a refused run quotes it.

A re-run under an existing name resumes the run, so it must train what the run trains: a config
that differs in anything but operational keys is refused, naming the differences, unless the
user asks to resume with changes (the earlier config is then kept beside the new one).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime

from biglearn.data.storage import (
    StorageError,
    delete_file,
    exists,
    is_s3,
    join,
    read_bytes,
    read_tagged,
    write_bytes,
    write_if,
)
from biglearn.train.config import PretrainConfig

LEASE_TTL_S = 60.0
log = logging.getLogger("biglearn")
CONFIG = "config.json"
# Keys a resumed run may change freely: they decide how it is run, watched or scored, not what it learns.
OPERATIONAL = (
    "eval",
    "train.faults",
    "train.log_every",
    "train.tracker",
    "train.keep_checkpoints",
    "cluster.address",
    "cluster.max_failures",
    "cluster.torch_threads",
    "cluster.use_gpu",
    "cluster.zero_bucket_elements",
    "data.verify_max_bytes",
    "run.resume_with_changes",
)


class RunBusyError(RuntimeError):
    """Another process holds the run; the message names it and says what to do."""


class RunLease:
    """Held while the driver trains, exports and evaluates a run (a context manager)."""

    def __init__(self, run_uri: str, ttl_s: float = LEASE_TTL_S):
        self.run_uri, self.ttl_s = run_uri, ttl_s
        self.holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "token": uuid.uuid4().hex,
        }
        self._file = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._tag: str | None = None  # ETag of the lease object as this holder last wrote it
        self.lost_to: dict | None = None  # who took the lease over while this holder ran

    def __enter__(self) -> RunLease:
        create_run_folder(self.run_uri)
        if is_s3(self.run_uri):
            self._acquire_object()
        else:
            self._acquire_local()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self._file is not None:
            self._file.close()  # releases the flock; the file stays, naming the last holder
            return
        current = self._read_object()
        if self.lost_to is None and current.get("token") != self.holder["token"]:
            self.lost_to = current  # taken over while renewals failed, or deleted
        if self.lost_to is not None:
            raise RunBusyError(
                f"run folder {self.run_uri} was taken over while this run held it ({self._who(self.lost_to)}): its "
                "renewals failed for longer than the lease lasts. Its checkpoints and export may be mixed with that "
                "run's: check the folder, or run again under another run.name"
            )
        delete_file(self._object_uri)

    # Local paths: flock.
    def _acquire_local(self) -> None:
        import fcntl

        path = os.path.join(self.run_uri, ".lease")
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _parsed(handle.read())
            handle.close()
            raise RunBusyError(self._busy_message(holder)) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(self._shown(self.holder)))
        handle.flush()
        self._file = handle

    # Object storage: a renewed lease.
    @property
    def _object_uri(self) -> str:
        return join(self.run_uri, "_lease.json")

    def _read_object(self) -> dict:
        return _parsed(read_bytes(self._object_uri).decode()) if exists(self._object_uri) else {}

    def _acquire_object(self) -> None:
        found = read_tagged(self._object_uri)
        current = _parsed(found[0].decode()) if found else {}
        if current.get("token") and not self._expired(current):
            raise RunBusyError(self._busy_message(current))
        self._tag = self._write_lease(found[1] if found else None)
        if self._tag is None:  # another process created or took over the lease since it was read
            raise RunBusyError(self._busy_message(self._read_object()))
        self._renewer = threading.Thread(target=self._renew, name="biglearn-run-lease", daemon=True)
        self._renewer.start()

    def _write_lease(self, tag: str | None) -> str | None:
        """Writes this holder's lease over the one with ETag `tag` (None: where there is none);
        returns the new ETag, or None where another holder's lease is there instead. A refused
        write whose lease is this holder's own (an earlier attempt that went through before the
        client retried it) counts as written."""
        tag = write_if(self._object_uri, json.dumps({**self.holder, "renewed": time.time()}).encode(), tag)
        if tag is None:
            found = read_tagged(self._object_uri)
            if found and _parsed(found[0].decode()).get("token") == self.holder["token"]:
                return found[1]
        return tag

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                tag = self._write_lease(self._tag)
                if tag is None:
                    self.lost_to = self._read_object()
                    log.error(f"[biglearn] lost the lease on {self.run_uri} to {self._who(self.lost_to)}")
                    return
            except StorageError as exc:  # a passing outage: the lease holds until its TTL runs out
                log.warning(f"[biglearn] could not renew the lease on {self.run_uri}, retrying: {exc}")
                continue
            self._tag = tag

    def _expired(self, holder: dict) -> bool:
        if holder.get("host") == socket.gethostname() and not _alive(holder.get("pid", -1)):
            return True
        return time.time() - holder.get("renewed", 0) > self.ttl_s

    def _busy_message(self, holder: dict) -> str:
        who = self._who(holder)
        stale = (
            ""
            if not is_s3(self.run_uri)
            else (
                f" If that process is gone, its lease lapses {self.ttl_s:.0f} s after its last renewal; run again then."
            )
        )
        return (
            f"run folder {self.run_uri} is in use by a run still going ({who}): two runs under one name would "
            f"overwrite each other's checkpoints. Wait for it to finish, stop it, or choose another run.name.{stale}"
        )

    @classmethod
    def _who(cls, holder: dict) -> str:
        return ", ".join(f"{key} {value}" for key, value in cls._shown(holder).items()) or "another process"

    @staticmethod
    def _shown(holder: dict) -> dict:
        return {key: holder[key] for key in ("host", "pid", "started") if key in holder}


def create_run_folder(run_uri: str) -> None:
    """Makes `run_uri` (local) or checks that it can be written (object storage is checked with
    its bucket); a path that cannot be a folder is a StorageError saying why."""
    if is_s3(run_uri):
        return
    try:
        os.makedirs(run_uri, exist_ok=True)
    except OSError as exc:
        raise StorageError(
            f"cannot create the run folder {run_uri} ({exc.strerror}): set run.storage to a folder you can write to"
        ) from None
    if not os.access(run_uri, os.W_OK):
        raise StorageError(f"cannot write to the run folder {run_uri}: set run.storage to a folder you can write to")


def check_same_config(cfg: PretrainConfig, run_uri: str) -> None:
    """Writes `cfg` as the run's config.json, after checking that a run already started under this
    name trained with the same (see OPERATIONAL); with run.resume_with_changes the earlier
    config is kept as config.<UTC time>.json."""
    saved_uri = join(run_uri, CONFIG)
    new = cfg.to_json()
    if exists(saved_uri):
        saved_text = read_bytes(saved_uri)
        changes = config_changes(_parsed(saved_text.decode()), new)
        if changes and not cfg.run.resume_with_changes:
            listed = "; ".join(changes[:8]) + ("; ..." if len(changes) > 8 else "")
            raise RunBusyError(
                f"run {cfg.run.name} at {run_uri} was started with another config ({listed}). Running again under "
                "the same name resumes it: choose another run.name for a new run, or add "
                "--set run.resume_with_changes=true to resume this one with the changes"
            )
        if changes:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            write_bytes(join(run_uri, f"config.{stamp}.json"), saved_text)
    write_bytes(saved_uri, json.dumps(new, indent=2).encode())


def config_changes(saved: dict, new: dict) -> list[str]:
    """'key: old -> new' for every key that differs, operational keys left out. A key the saved
    config lacks (written before the key existed) counts as its default."""
    try:
        saved = PretrainConfig.model_validate(saved).to_json()
    except ValueError:  # written by a version with other keys: compared as it is
        pass
    flat_saved, flat_new = _flat(saved), _flat(new)
    changes = []
    for key in sorted(flat_saved.keys() | flat_new.keys()):
        if any(key == skip or key.startswith(skip + ".") for skip in OPERATIONAL):
            continue
        if flat_saved.get(key, "(absent)") != flat_new.get(key, "(absent)"):
            changes.append(f"{key}: {flat_saved.get(key, '(absent)')} -> {flat_new.get(key, '(absent)')}")
    return changes


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _parsed(text: str) -> dict:
    try:
        parsed = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _alive(pid: int) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True
