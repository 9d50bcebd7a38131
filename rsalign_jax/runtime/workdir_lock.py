"""One training run per workdir: an exclusive `flock` on WORKDIR/.lock, held by process 0 for the whole run.

The kernel releases the lock when its process ends, however it ends, so a lock left by a killed run is free again
without any clean-up; the file itself only records who holds it (pid, host, start time) for the error message.
"""
import contextlib
import datetime
import fcntl
import json
import os
import socket

import jax

LOCK_NAME = ".lock"


class WorkdirBusyError(RuntimeError):
  """Another run holds the workdir."""


@contextlib.contextmanager
def hold(workdir):
  """Holds WORKDIR/.lock while the block runs (process 0 only; other processes of a run share its lock)."""
  if jax.process_index() != 0:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_NAME)
  with open(path, "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      try:
        owner = json.loads(f.read())
        who = f"process {owner['pid']} on {owner['host']}, started {owner['started']}"
      except (ValueError, KeyError):
        who = "another process"
      raise WorkdirBusyError(f"--workdir={workdir} is in use by another run ({who}); wait for it to end or choose "
                             "another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "started": datetime.datetime.now().isoformat(timespec="seconds")}))
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
