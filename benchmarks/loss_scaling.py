"""Per-device memory and step time of the retrieval losses at large global batch, on 8 virtual CPU devices.

  python benchmarks/loss_scaling.py --batches=4096,16384,32768,65536 --time_up_to=16384

For each loss and impl ('global' = the reference under jit, XLA partitioning it; 'gather'; 'ring'; 'ring' in
column chunks of --block_size) compiles forward + backward (gradients of embeddings and scalars) on (B, D) f32
embeddings sharded over the batch and prints a markdown table of XLA's per-device temporary memory
(`memory_analysis().temp_size_in_bytes`, no allocation needed) and, up to --time_up_to, the seconds per step.
XLA:CPU memory is indicative of the scaling only: GPU and TPU schedule buffers differently.
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from rsalign_jax.losses import contrastive, sigmoid, triplet  # noqa: E402
from rsalign_jax.runtime import sharding as sharding_lib  # noqa: E402

_BATCHES = flags.DEFINE_list("batches", ["4096", "16384", "32768", "65536"], "Global batch sizes.")
_LOSSES = flags.DEFINE_list("losses", ["softmax", "sigmoid", "vse++"], "Losses to measure.")
_DIM = flags.DEFINE_integer("dim", 512, "Embedding dimension.")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 1024, "Column chunk of the chunked ring variant.")
_TIME_UP_TO = flags.DEFINE_integer("time_up_to", 16384, "Time steps only for batches up to this size.")

LOSSES = {
    "softmax": lambda p, ids, **impl: contrastive.softmax_loss(p["images"], p["texts"], ids,
                                                               log_scale=p["log_scale"], **impl),
    "sigmoid": lambda p, ids, **impl: sigmoid.sigmoid_loss(p["images"], p["texts"], ids, log_scale=p["log_scale"],
                                                           bias=p["bias"], **impl),
    "vse++": lambda p, ids, **impl: triplet.vse_loss(p["images"], p["texts"], ids, negatives="hardest", **impl),
}


def variants(block_size):
  return [("global", None), ("gather", None), ("ring", None), (f"ring/{block_size}", block_size)]


def compile_step(loss, impl, block_size, mesh, batch, dim):
  impl_name = impl.split("/")[0]
  step = jax.jit(jax.value_and_grad(lambda p, ids: loss(p, ids, impl=impl_name, mesh=mesh, block_size=block_size)))
  rows, scalar = NamedSharding(mesh, P(sharding_lib.BATCH_AXES)), NamedSharding(mesh, P())
  params = {"images": jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=rows),
            "texts": jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=rows),
            "log_scale": jax.ShapeDtypeStruct((), jnp.float32, sharding=scalar),
            "bias": jax.ShapeDtypeStruct((), jnp.float32, sharding=scalar)}
  return step.lower(params, jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)).compile()


def seconds_per_step(compiled, mesh, batch, dim):
  rng = np.random.default_rng(0)
  rows, scalar = NamedSharding(mesh, P(sharding_lib.BATCH_AXES)), NamedSharding(mesh, P())
  params = {"images": jax.device_put(rng.normal(size=(batch, dim)).astype(np.float32), rows),
            "texts": jax.device_put(rng.normal(size=(batch, dim)).astype(np.float32), rows),
            "log_scale": jax.device_put(np.float32(np.log(10.0)), scalar),
            "bias": jax.device_put(np.float32(-10.0), scalar)}
  ids = jax.device_put(np.arange(batch, dtype=np.int32) // 5, rows)  # five captions per image
  jax.block_until_ready(compiled(params, ids))
  start = time.perf_counter()
  jax.block_until_ready(compiled(params, ids))
  return time.perf_counter() - start


def main(argv):
  del argv
  mesh = sharding_lib.make_mesh()
  print(f"{jax.device_count()} devices, D={_DIM.value}, forward + backward, f32 embeddings\n")
  print("| loss | B | impl | temp MiB / device | vs global | s / step |")
  print("|---|---:|---|---:|---:|---:|")
  for name in _LOSSES.value:
    for batch in map(int, _BATCHES.value):
      baseline = None
      for impl, block_size in variants(_BLOCK_SIZE.value):
        compiled = compile_step(LOSSES[name], impl, block_size, mesh, batch, _DIM.value)
        temp = compiled.memory_analysis().temp_size_in_bytes
        baseline = baseline or temp
        seconds = (f"{seconds_per_step(compiled, mesh, batch, _DIM.value):.2f}" if batch <= _TIME_UP_TO.value
                   else "not run")
        print(f"| {name} | {batch} | {impl} | {temp / 2**20:,.0f} | {temp / baseline:.2f} | {seconds} |",
              flush=True)


if __name__ == "__main__":
  app.run(main)
