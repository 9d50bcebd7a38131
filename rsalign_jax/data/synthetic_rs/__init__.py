"""Synthetic remote-sensing image-caption benchmark (see `builder` for the design)."""

from rsalign_jax.data.synthetic_rs.builder import SyntheticRs
from rsalign_jax.data.synthetic_rs.scenes import SCENE_CLASSES, generate_example

__all__ = ["SCENE_CLASSES", "SyntheticRs", "generate_example"]
