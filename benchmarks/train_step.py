"""Train-step throughput of a method's config on this machine, on random inputs (no input pipeline).

  python benchmarks/train_step.py --config=configs/hvsa.py --sizes=64,80,96 --widths=16,32

Prints seconds per step and images/s for each (image size, ResNet width) at the config's batch size, so CPU-size
configs can be chosen from measurements (e.g. XLA:CPU is pathologically slow on 3x3 convs over 2x2 maps, which is
why the default synthetic run uses 80 px: 64 px leaves a 2x2 last stage).
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from rsalign_jax import optimizers
from rsalign_jax import train
from rsalign_jax.runtime import sharding as sharding_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/hvsa.py", "Method config.", lock_config=False)
_SIZES = flags.DEFINE_list("sizes", ["80"], "Image sizes to time.")
_WIDTHS = flags.DEFINE_list("widths", [], "ResNet widths to time (default: the config's).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps after one warm-up step.")
_VOCAB = 250


def time_step(config, image_size):
  mesh = sharding_lib.make_mesh()
  batch_size = config.input.batch_size
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32),
           "tokens": rng.integers(1, _VOCAB, size=(batch_size, config.text.max_len)).astype(np.int32),
           "lengths": rng.integers(8, 16, size=(batch_size,)).astype(np.int32),
           "image_id": np.arange(batch_size, dtype=np.int32)}
  batch = sharding_lib.to_global(batch, sharding_lib.batch_sharding(mesh))
  model, objective = train.build_model(config, _VOCAB), train.build_objective(config)
  schedule = optimizers.make_schedule(config, steps_per_epoch=100)
  tx = optimizers.make_optimizer(config, schedule)
  state = jax.jit(functools.partial(train.create_train_state, model=model, objective=objective, tx=tx,
                                    example=jax.tree.map(lambda x: x[:16], batch)))(jax.random.key(0))
  step = jax.jit(functools.partial(train.train_step, model=model, objective=objective, tx=tx, schedule=schedule,
                                   dropout_key=jax.random.key(1)))
  start = time.time()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_seconds = time.time() - start
  start = time.time()
  for _ in range(_STEPS.value):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.time() - start) / _STEPS.value
  return compile_seconds, seconds, batch_size / seconds


def main(argv):
  del argv
  config = _CONFIG.value
  widths = [int(w) for w in _WIDTHS.value] or [config.model.resnet_width]
  print(f"{config.model_name}, global batch {config.input.batch_size}, {jax.device_count()} {jax.devices()[0].platform}"
        " device(s)\n")
  print("| image px | ResNet width | compile+1st step s | s/step | images/s |\n|---:|---:|---:|---:|---:|")
  for size in (int(s) for s in _SIZES.value):
    for width in widths:
      config.model.resnet_width = width
      compile_seconds, seconds, images_per_second = time_step(config, size)
      print(f"| {size} | {width} | {compile_seconds:.1f} | {seconds:.3f} | {images_per_second:.0f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
