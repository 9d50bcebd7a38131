"""Content-based image retrieval (CBRSIR) by hash codes, the exhaustive Hamming row of benchmarks/hash_retrieval.py:
each image of `split` queries the images of `gallery_split`, ranked by the Hamming distance of the model's binary
codes (`serving.hash_index`); relevant = same scene class. Metrics `mAP<K>` and `P<K>` for K in `ks` (the benchmark's
mAP@K and P@K in percent; a TensorBoard tag holds no '@').
"""
import numpy as np

from rsalign_jax.runtime import metric_writer
from rsalign_jax.serving import embedding, hash_index

log = metric_writer.log


class Evaluator:
  """Hash-code image->image retrieval of a hashing model (`HASH_CODES`) on a dataset with scene classes."""

  def __init__(self, setup, name, *, split, gallery_split, ks=(10, 50)):
    if not setup.model.HASH_CODES:
      raise ValueError(f"evals.{name}.type='hash_retrieval': model {setup.config.model_name!r} has no hash codes "
                       f"(HASH_CODES); set evals.{name}.enabled=False")
    self.name, self._setup, self._ks = name, setup, tuple(int(k) for k in ks)
    self._queries, self._gallery = setup.split(split), setup.split(gallery_split)
    if not 1 <= min(self._ks) <= max(self._ks) <= self._gallery.index.num_images:
      raise ValueError(f"evals.{name}.ks={tuple(ks)}: expected 1 <= K <= the {self._gallery.index.num_images} "
                       f"{gallery_split} images")
    self._query_scenes, self._gallery_scenes = (_scenes(name, data) for data in (self._queries, self._gallery))

  def run(self, variables, step, writer):
    del writer  # `evaluators.run` writes the metrics
    query_words, gallery_words = (hash_index.pack_codes(self._codes(variables, data))
                                  for data in (self._queries, self._gallery))
    ranked, _ = hash_index.hamming_top_k(query_words, gallery_words, max(self._ks))
    scores = hash_index.retrieval_scores(ranked, self._query_scenes, self._gallery_scenes, self._ks)
    metrics = {metric.replace("@", ""): value for metric, value in scores.items()}
    log("%s @%d: %s", self.name, step, ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    return metrics

  def _codes(self, variables, data):
    return embedding.embed_all(self._setup, variables, "image_codes", embedding.image_batches(self._setup, data))


def _scenes(name, data):
  """The scene class of each image of the split `data`."""
  if "scene" not in data.source[0]:
    raise ValueError(f"evals.{name}: split {data.name!r} has no 'scene' feature, which hash retrieval's relevance "
                     f"(same scene class) needs; set evals.{name}.enabled=False")
  return np.asarray([int(data.source[i]["scene"]) for i in range(data.index.num_images)])
