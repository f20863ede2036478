"""One owner per run directory: an exclusive `flock` on ``{run_dir}/run.lock``.

The training process that writes a run dir (the main process) holds the lock
for its whole life. The kernel releases a `flock` when its holder exits in any
way (SIGKILL included), so a lock file left behind by a dead run is simply
taken over. The file records the owner (pid, host, start time, command) for
the message a second run gets:

* held by a live process: refused, naming pid and host;
* held although the recorded pid is gone on this host: a process that
  inherited the descriptor (started by the dead run) still holds it; the
  message says how to find it (``fuser -v`` / ``lsof``);
* held by another host (a run dir on a shared file system): refused, naming
  the host; if that host is down, its lock server releases the lock, or the
  file can be deleted by hand once nothing runs there.

Locks are advisory and only taken by this trainer; `flock` on NFS needs NFSv4
(or Linux >= 2.6.12 clients, which emulate it with POSIX locks).
"""

import fcntl
import json
import os
import socket
import sys
import time

LOCK_NAME = "run.lock"
_HELD = []  # locks this process holds (release_all: for callers that run the trainer in-process)


class RunDirBusy(RuntimeError):
    """Another process owns the run directory; the message says which and what to do."""


def _describe(owner):
    return (f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')} (since {owner.get('started', '?')}: "
            f"{owner.get('command', '?')})")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def busy_message(run_dir, owner):
    """What to tell the user when `owner` (the lock file's record) holds the lock."""
    path = os.path.join(run_dir, LOCK_NAME)
    who = _describe(owner)
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int) \
            and not _pid_alive(owner["pid"]):
        return (f"run dir {run_dir} is locked, but its recorded owner, {who}, has exited: a process it started "
                f"still holds {path}. Find it with `fuser -v {path}` (or `lsof {path}`) and stop it, then run again")
    if owner.get("host") not in (None, socket.gethostname()):
        return (f"run dir {run_dir} is in use by {who}. Stop that run first or choose another save_dir; if that "
                f"host is down and nothing runs there any more, delete {path}")
    return f"run dir {run_dir} is in use by {who}. Stop that run first or choose another save_dir"


class RunDirLock:
    """`RunDirLock.acquire(run_dir)` -> the held lock (or RunDirBusy); `release()` frees it.
    `previous` is the record left by an earlier owner that exited without releasing, if any."""

    def __init__(self, run_dir, fd, previous):
        self.run_dir, self.fd, self.previous = run_dir, fd, previous

    @classmethod
    def acquire(cls, run_dir):
        path = os.path.join(run_dir, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise RunDirBusy(busy_message(run_dir, owner)) from None
        previous = _read_owner(fd)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)[:300], "released": False}
        _write_owner(fd, record)
        lock = cls(run_dir, fd, previous if previous and not previous.get("released") else None)
        _HELD.append(lock)
        return lock

    def release(self):
        if self.fd is None:
            return
        _write_owner(self.fd, {**_read_owner(self.fd), "released": True})
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
        if self in _HELD:
            _HELD.remove(self)


def release_all():
    for lock in list(_HELD):
        lock.release()


def _read_owner(fd):
    try:
        data = os.pread(fd, 65536, 0)
        owner = json.loads(data.decode("utf-8")) if data.strip() else {}
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_owner(fd, record):
    data = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
