"""XLA:CPU settings the project applies by itself, before JAX starts a backend (`import rsalign_jax` does it).

XLA:CPU hands convolutions to YNNPACK by default; on the machines this project is measured on, XLA's own (Eigen)
convolution computes the kernel gradients of the ResNet towers' 3x3 convolutions about twice as fast, so
convolutions are taken out of YNNPACK (matmuls stay there). A flag the user already set in XLA_FLAGS is left as
it is, and nothing changes once a backend has started. Other platforms ignore XLA:CPU flags.
"""
import os

FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "-individual_convolution"}


def apply_defaults(environ=os.environ) -> None:
  """Appends each of FLAGS to environ['XLA_FLAGS'] unless XLA_FLAGS already names it."""
  current = environ.get("XLA_FLAGS", "")
  missing = [f"--{name}={value}" for name, value in FLAGS.items() if f"--{name}=" not in current]
  if missing:
    environ["XLA_FLAGS"] = " ".join([current, *missing]).strip()
