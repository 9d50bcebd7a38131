"""rsalign_jax: remote-sensing cross-modal text-image retrieval in JAX/Flax."""
from rsalign_jax.runtime import xla_cpu

xla_cpu.apply_defaults()


def load(workdir, checkpoint="", config=None):
  """The trained model of `workdir`: a `rsalign_jax.serving.retriever.Retriever` (encode_images, encode_texts,
  score, search, classify); see `retriever.load` for the arguments."""
  from rsalign_jax.serving import retriever  # pylint: disable=g-import-not-at-top  (JAX and the models: load only)
  return retriever.load(workdir, checkpoint, config)
