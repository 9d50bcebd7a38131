"""Content-based image retrieval (CBRSIR) with a trained CCLS2T: float cosine vs Hamming codes vs a two-level index.

  python benchmarks/hash_retrieval.py --workdir=/tmp/wd_ccls2t [--config=configs/ccls2t.py[:arg]]

Trains nothing: restores `workdir/best` (else the newest `workdir/checkpoints`) of a finished run of `--config`,
embeds the test split (queries) and the train split (gallery) with the eval preprocessing, and prints mAP@K and P@K
(relevant = same scene class, `rsalign_jax.serving.hash_index.retrieval_scores`), the gallery items scored per
query and the query latency (wall time of the jitted, query-batched search over all queries / number of queries,
best of `--repeats` after a warm-up) for: exhaustive float cosine, exhaustive Hamming, and the two-level index
(k-means or class clusters over the gallery codes, optionally re-ranked by cosine).
"""
import os
import time

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from rsalign_jax import experiment
from rsalign_jax.data import preprocessing
from rsalign_jax.data import sources
from rsalign_jax.serving import hash_index
from rsalign_jax.runtime import checkpointing
from rsalign_jax.runtime import sharding as sharding_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ccls2t.py", "The run's config, `file.py[:arg]`.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a finished run of --config.")
_KS = flags.DEFINE_list("ks", ["10", "50"], "The K of mAP@K and P@K.")
_CLUSTERS = flags.DEFINE_integer("clusters", 32, "k-means clusters of the two-level index.")
_PROBE = flags.DEFINE_integer("probe", 4, "Clusters probed per query (k-means index).")
_CLASS_PROBE = flags.DEFINE_integer("class_probe", 2, "Clusters probed per query (class-cluster index).")
_RERANK = flags.DEFINE_integer("rerank_depth", 100, "Hamming candidates re-ranked by cosine.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions of each search (the best is reported).")
flags.mark_flags_as_required(["workdir"])


def restore_state(setup, workdir):
  """The best-by-val state of `workdir`, else its newest checkpoint."""
  for sub in ("best", "checkpoints"):
    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, sub), keep=1)
    if checkpointer.latest_step() is not None:
      state, _, _ = checkpointer.restore(setup.abstract_state)
      checkpointer.close()
      return state, sub
    checkpointer.close()
  raise ValueError(f"--workdir={workdir}: no checkpoint under best/ or checkpoints/")


def encode_split(setup, state, split):
  """(float embeddings (N, D), relaxed codes (N, K), scene labels (N,)) of every image of `split`."""
  config = setup.config
  source = sources.open_split(config.dataset, split)
  if "scene" not in source[0]:
    raise ValueError(f"dataset {config.dataset.name!r} has no 'scene' feature: CBRSIR relevance needs scene classes")
  pp = preprocessing.parse(config.input.pp_eval)
  variables = experiment.model_variables(state)
  encode = jax.jit(lambda v, images: setup.model.apply(v, images, train=False, method="encode_images"),
                   out_shardings=sharding_lib.replicated(setup.mesh))
  sharding = sharding_lib.batch_sharding(setup.mesh)
  rng = np.random.default_rng(0)
  size = config.eval_batch_size
  embeddings, codes, labels = [], [], []
  for start in range(0, len(source), size):
    records = [source[i] for i in range(start, min(start + size, len(source)))]
    images = np.stack([pp(r["image"], rng) for r in records])
    padded = np.concatenate([images, np.zeros((size - len(images),) + images.shape[1:], images.dtype)])
    out = jax.device_get(encode(variables, sharding_lib.to_global(padded, sharding)))
    embeddings.append(out["embedding"][:len(images)])
    codes.append(out["codes"][:len(images)])
    labels.extend(int(r["scene"]) for r in records)
  return np.concatenate(embeddings), np.concatenate(codes), np.asarray(labels)


def timed(search, repeats):
  """(result, seconds of the fastest of `repeats` runs after a warm-up run)."""
  result = search()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    result = search()
    best = min(best, time.perf_counter() - start)
  return result, best


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, workdir = _CONFIG.value, os.path.abspath(_WORKDIR.value)
  ks = [int(k) for k in _KS.value]
  mesh = sharding_lib.make_mesh()
  with jax.set_mesh(mesh):
    setup = experiment.build_setup(config, workdir, mesh)
    state, restored = restore_state(setup, workdir)
    query_emb, query_codes, query_labels = encode_split(setup, state, config.dataset.test_split)
    gallery_emb, gallery_codes, gallery_labels = encode_split(setup, state, config.dataset.train_split)
  depth = max(ks)
  query_words, gallery_words = hash_index.pack_codes(query_codes), hash_index.pack_codes(gallery_codes)
  kmeans_index = hash_index.TwoLevelIndex.build(gallery_codes, num_clusters=_CLUSTERS.value, embeddings=gallery_emb)
  class_index = hash_index.TwoLevelIndex.build(gallery_codes, labels=gallery_labels)
  num_gallery = len(gallery_codes)
  methods = {
      f"exhaustive float cosine ({gallery_emb.shape[1]}-d)": (
          lambda: hash_index.cosine_top_k(query_emb, gallery_emb, depth)[0], num_gallery),
      f"exhaustive Hamming ({gallery_codes.shape[1]} bits)": (
          lambda: hash_index.hamming_top_k(query_words, gallery_words, depth)[0], num_gallery),
      f"two-level: k-means {_CLUSTERS.value}, probe {_PROBE.value}": (
          lambda: kmeans_index.search(query_codes, depth, probe=_PROBE.value),
          kmeans_index.mean_candidates(query_codes, _PROBE.value)),
      f"two-level: k-means {_CLUSTERS.value}, probe {_PROBE.value}, cosine re-rank {_RERANK.value}": (
          lambda: kmeans_index.search(query_codes, depth, probe=_PROBE.value, rerank_depth=_RERANK.value,
                                      query_embeddings=query_emb),
          kmeans_index.mean_candidates(query_codes, _PROBE.value)),
      f"two-level: {class_index.num_clusters} class clusters, probe {_CLASS_PROBE.value}": (
          lambda: class_index.search(query_codes, depth, probe=_CLASS_PROBE.value),
          class_index.mean_candidates(query_codes, _CLASS_PROBE.value)),
  }
  columns = [f"{m}@{k}" for k in ks for m in ("mAP", "P")]
  print(f"CBRSIR on {config.dataset.name}: {len(query_codes)} {config.dataset.test_split} queries, {num_gallery} "
        f"{config.dataset.train_split} gallery images, relevant = same scene; model {config.model_name} restored "
        f"from {restored}/ (step {int(state.step)}); {jax.device_count()} {jax.devices()[0].platform} device(s)\n")
  print("| method | " + " | ".join(columns) + " | scored/query | ms/query |")
  print("|---|" + "---:|" * (len(columns) + 2))
  for name, (search, scored) in methods.items():
    ranked, seconds = timed(search, _REPEATS.value)
    scores = hash_index.retrieval_scores(ranked, query_labels, gallery_labels, ks)
    print(f"| {name} | " + " | ".join(f"{scores[c]:.2f}" for c in columns)
          + f" | {scored:.0f} | {1000 * seconds / len(query_codes):.4f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
