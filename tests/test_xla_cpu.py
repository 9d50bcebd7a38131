"""The XLA:CPU settings `import rsalign_jax` applies: added once, never over the user's own, and in effect."""
import jax
import jax.numpy as jnp

import rsalign_jax  # noqa: F401  (applies the settings, as every entry point does)
from rsalign_jax.runtime import xla_cpu


def test_settings_are_appended_once_and_never_replace_the_users_own():
  environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  xla_cpu.apply_defaults(environ)
  xla_cpu.apply_defaults(environ)
  assert environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 "
                                  "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution")
  users_own = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot"}
  xla_cpu.apply_defaults(users_own)
  assert users_own == {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot"}
  empty = {}
  xla_cpu.apply_defaults(empty)
  assert empty == {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"}


def test_convolutions_and_their_gradients_are_compiled_outside_ynnpack():
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  x, w = jnp.ones((2, 16, 16, 32)), jnp.ones((3, 3, 32, 32))  # without the setting, both convolutions go to YNNPACK
  hlo = jax.jit(jax.grad(lambda x, w: conv(x, w).sum(), argnums=(0, 1))).lower(x, w).compile().as_text()
  assert "convolution(" in hlo
  assert "__ynn_fusion" not in hlo
