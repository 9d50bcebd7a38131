"""rsalign_jax: remote-sensing cross-modal text-image retrieval in JAX/Flax."""
from rsalign_jax.runtime import xla_cpu

xla_cpu.apply_defaults()
