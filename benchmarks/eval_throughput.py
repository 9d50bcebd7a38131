"""Retrieval throughput: exact top-k over a large gallery of random embeddings vs this machine's plain matmul.

  python benchmarks/eval_throughput.py --images=20000 --captions=100000 --dim=256

Times `rsalign_jax.evaluation.topk.exact_topk` in both directions (text->image: every caption ranks all images;
image->text: every image ranks all captions) on random unit embeddings, with queries and gallery either in host
memory (streamed to the devices chunk by chunk, as a memory-mapped export is) or already on the devices, and
compares its similarity GFLOP/s (2 x images x captions x dim per direction) with this machine's plain float32 matmul
(the faster of a search-block-shaped and a 4096 x 32768 score block; no ranking, no transfers), which bounds what any
exact search can reach on the same devices. Prints a markdown table.
"""
import time

import jax
import numpy as np
from absl import app
from absl import flags

from rsalign_jax.evaluation import topk

_IMAGES = flags.DEFINE_integer("images", 20000, "Image gallery rows.")
_CAPTIONS = flags.DEFINE_integer("captions", 100000, "Caption gallery rows.")
_DIM = flags.DEFINE_integer("dim", 256, "Embedding dimension.")
_K = flags.DEFINE_integer("k", 10, "Results per query.")
_CHUNK_ROWS = flags.DEFINE_integer("chunk_rows", 16384, "Gallery rows per device per chunk.")
_QUERY_BLOCK = flags.DEFINE_integer("query_block", 1024, "Queries scored at once per device.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs after a warm-up; the best is reported.")
_PLACES = flags.DEFINE_list("places", ["host", "device"], "Where queries and gallery start: host and/or device "
                            "memory (the same on a CPU backend).")


def best_time(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def unit_rows(rng, rows, dim):
  x = rng.standard_normal((rows, dim), dtype=np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def matmul_gflops(rows, cols, dim, repeats):
  """GFLOP/s of one jitted (rows, dim) x (dim, cols) float32 matmul on the default device."""
  rng = np.random.default_rng(1)
  a = jax.device_put(unit_rows(rng, rows, dim))
  b = jax.device_put(unit_rows(rng, cols, dim))
  matmul = jax.jit(lambda a, b: topk.dot_scores(None, a, b))
  seconds = best_time(lambda: matmul(a, b).block_until_ready(), repeats + 2)
  return 2 * rows * cols * dim / seconds / 1e9


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  images, captions = unit_rows(rng, _IMAGES.value, _DIM.value), unit_rows(rng, _CAPTIONS.value, _DIM.value)
  devices = jax.devices()
  flop = 2 * _IMAGES.value * _CAPTIONS.value * _DIM.value
  print(f"{len(devices)} {devices[0].platform} device(s) ({devices[0].device_kind}); gallery of {_IMAGES.value:,} "
        f"images x {_CAPTIONS.value:,} captions, dim {_DIM.value}, k={_K.value}, float32\n")
  plain = 0.0
  for rows, cols in ((_QUERY_BLOCK.value, min(_CHUNK_ROWS.value, _IMAGES.value)), (4096, 32768)):
    gflops = matmul_gflops(rows, cols, _DIM.value, _REPEATS.value)
    plain = max(plain, gflops)
    print(f"plain matmul ({rows} x {_DIM.value}) x ({_DIM.value} x {cols}): {gflops:.1f} GFLOP/s")
  print(f"reference: the faster, {plain:.1f} GFLOP/s\n")
  print("| direction | embeddings in | queries | gallery | seconds | queries/s | similarity GFLOP/s | "
        "% of plain matmul |")
  print("|---|---|---:|---:|---:|---:|---:|---:|")
  placements = {"host": lambda x: x, "device": jax.device_put}
  for place in _PLACES.value:
    put = placements[place]
    for name, queries, gallery in (("text -> image", captions, images), ("image -> text", images, captions)):
      queries, gallery = put(queries), put(gallery)

      def run():
        topk.exact_topk(queries, gallery, _K.value, chunk_rows=_CHUNK_ROWS.value, query_block=_QUERY_BLOCK.value)

      seconds = best_time(run, _REPEATS.value)
      gflops = flop / seconds / 1e9
      print(f"| {name} | {place} memory | {len(queries):,} | {len(gallery):,} | {seconds:.3f} | "
            f"{len(queries) / seconds:,.0f} | {gflops:.1f} | {100 * gflops / plain:.0f}% |", flush=True)


if __name__ == "__main__":
  app.run(main)
