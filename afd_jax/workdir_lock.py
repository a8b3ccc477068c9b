"""One run per workdir: a lock file naming its holder (host, pid, start, heartbeat).

A second process on the same workdir (a requeued job while the old one still runs, a command
typed twice) refuses at once, naming the holder. A lock whose holder is gone is taken over
without asking:
- local and NFS folders: the lock is an `fcntl.flock` on `workdir/LOCK`, which the kernel (or the
  NFS server's lease) drops when the holder dies, SIGKILL and lost nodes included; the file's
  JSON content only names the holder.
- object stores (`gs://...`), which have no locks: the holder rewrites its heartbeat every
  HEARTBEAT_SECONDS; a lock whose heartbeat is older than STALE_SECONDS is taken over. (Two
  processes starting within a few seconds of each other can both pass this check there.)
Multi-host jobs: process 0 holds the lock for the job (train.py decides, and every process
follows its answer).
"""
import datetime
import fcntl
import json
import os
import socket
import threading
import time
from typing import Optional

from etils import epath

from afd_jax.errors import UserError

LOCK = 'LOCK'
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def _describe(holder: dict) -> str:
  age = time.time() - float(holder.get('heartbeat_unix', 0))
  return (f'pid {holder.get("pid", "?")} on {holder.get("host", "?")}, started '
          f'{holder.get("started", "?")}, last heartbeat {age:.0f} s ago')


class WorkdirLock:
  """Held from `acquire()` to `release()` (or the process's end)."""

  def __init__(self, workdir: str):
    self.workdir = str(workdir)
    self.remote = '://' in self.workdir
    self.path = epath.Path(self.workdir) / LOCK
    self._fd: Optional[int] = None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self._info = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': _now()}
    self.took_over: Optional[dict] = None  # the dead holder's record, when taken over

  def _record(self) -> str:
    return json.dumps({**self._info, 'heartbeat_unix': time.time()})

  def _read_holder(self) -> dict:
    try:
      return json.loads(self.path.read_text() or '{}')
    except (OSError, ValueError):
      return {}

  def acquire(self) -> 'WorkdirLock':
    """Takes the lock or raises UserError naming the live holder."""
    previous = self._read_holder()
    if self.remote:
      if previous and time.time() - float(previous.get('heartbeat_unix', 0)) < STALE_SECONDS:
        raise UserError(f'{self.workdir} is in use by another run ({_describe(previous)}). '
                        'Stop it, or use another --workdir.')
      self.path.write_text(self._record())
    else:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError:
        os.close(fd)
        time.sleep(0.2)  # A holder that has just started may not have written its record yet.
        raise UserError(f'{self.workdir} is in use by another run '
                        f'({_describe(self._read_holder() or previous)}). '
                        'Stop it, or use another --workdir.') from None
      self._fd = fd
      self._write_local()
    self.took_over = previous or None
    self._thread = threading.Thread(target=self._heartbeat, name='workdir-lock', daemon=True)
    self._thread.start()
    return self

  def _write_local(self) -> None:
    data = self._record().encode()
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, data, 0)

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      try:
        if self.remote:
          self.path.write_text(self._record())
        else:
          self._write_local()
      except OSError:
        pass  # A missed heartbeat only makes the lock look older.

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
    try:
      if self.remote:
        self.path.unlink(missing_ok=True)
      elif self._fd is not None:
        os.ftruncate(self._fd, 0)  # Leave no holder named; the file itself stays.
        os.close(self._fd)  # Closing drops the flock.
    except OSError:
      pass
    self._fd = None
