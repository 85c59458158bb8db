"""One training run per workdir: an exclusive `fcntl` lock on ``WORKDIR/.lock``.

The lock belongs to the open file, so the operating system releases it when the process ends,
however it ends (a SIGKILLed run never leaves a stale lock). The file records the holder's pid,
host and start time for the message a second run gets. Reading a workdir (evaluation, search)
takes no lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"


class WorkdirLockedError(RuntimeError):
    """Another live process trains in this workdir; the message names its pid and host."""


class WorkdirLock:
    """An exclusive, non-blocking lock on a workdir, held until `release` or process exit.

    Args:
      workdir: the run's directory (created if missing).

    Raises:
      WorkdirLockedError: another process holds the lock.
    """

    def __init__(self, workdir: str | os.PathLike):
        self.path = Path(workdir) / LOCK_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")  # noqa: SIM115  (held open while the lock is held)
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip()
            self._file.close()
            raise WorkdirLockedError(
                f"{self.path.parent} is in use by another training run ({_describe(holder)}); "
                "wait for it to finish or use another --workdir"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        self._file.write(json.dumps(record))
        self._file.flush()

    def release(self) -> None:
        """Releases the lock (idempotent)."""
        if not self._file.closed:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()


def _describe(holder: str) -> str:
    try:
        record = json.loads(holder)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["since"]))
        return f"pid {record['pid']} on host {record['host']}, since {started}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
