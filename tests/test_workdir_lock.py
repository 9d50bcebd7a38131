"""One run per workdir: a second run stops with a clear message; a killed run's lock is free again."""
import os
import signal
import subprocess
import sys

import pytest

from helpers import runlocal_config
from rsalign_jax import train
from rsalign_jax.runtime import workdir_lock

HOLDER = ("import sys, time; from rsalign_jax.runtime import workdir_lock\n"
          "with workdir_lock.hold(sys.argv[1]):\n  print('held', flush=True); time.sleep(600)")


def test_a_second_holder_is_refused_with_the_owner_named(tmp_path):
  with workdir_lock.hold(str(tmp_path)):
    with pytest.raises(workdir_lock.WorkdirBusyError,
                       match=rf"--workdir={tmp_path} is in use by another run \(process {os.getpid()} on .*, started "
                             r".*\); wait for it to end or choose another --workdir"):
      with workdir_lock.hold(str(tmp_path)):
        pass
  with workdir_lock.hold(str(tmp_path)):  # released at the end of the block
    pass


def test_training_on_a_busy_workdir_stops_before_doing_anything(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("busy")
  with workdir_lock.hold(str(workdir)):
    with pytest.raises(workdir_lock.WorkdirBusyError, match="is in use by another run"):
      train.train_and_evaluate(runlocal_config(tmp_path_factory), str(workdir))
  assert sorted(p.name for p in workdir.iterdir()) == [workdir_lock.LOCK_NAME]


def test_the_lock_of_a_killed_run_is_free_again(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(workdir_lock.WorkdirBusyError, match=f"process {holder.pid} on"):
      with workdir_lock.hold(str(tmp_path)):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with workdir_lock.hold(str(tmp_path)):
    pass
