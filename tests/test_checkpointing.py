"""Checkpoints of the train state, the loader position and JSON metadata: round trips, read by a fresh process's
checkpointer without orbax's per-item warnings."""
import json
import logging

import jax.numpy as jnp
import numpy as np

from rsalign_jax.runtime import checkpointing


def test_a_fresh_checkpointer_restores_every_item_quietly(tmp_path, caplog):
  state = {"params": {"kernel": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.int32(7)}
  writer = checkpointing.Checkpointer(str(tmp_path), keep=2)
  writer.save(3, state, meta={"best_step": 2})
  writer.save(7, state, loader_state=json.dumps({"position": 42}).encode(), meta={"best_step": 7})
  writer.wait_until_finished()
  writer.close()
  caplog.set_level(logging.WARNING)
  reader = checkpointing.Checkpointer(str(tmp_path), keep=2)  # as in a new process: --mode=eval, a resumed run
  abstract = {"params": {"kernel": jnp.zeros((2, 3))}, "step": jnp.int32(0)}
  restored, loader_state, meta = reader.restore(abstract)
  np.testing.assert_array_equal(restored["params"]["kernel"], state["params"]["kernel"])
  assert int(restored["step"]) == 7 and json.loads(loader_state) == {"position": 42} and meta == {"best_step": 7}
  _, no_loader, first_meta = reader.restore(abstract, step=3)
  assert no_loader is None and first_meta == {"best_step": 2}
  reader.close()
  assert not [r for r in caplog.records if "could not be restored" in r.getMessage()]
