"""torchvision ResNet state dicts (`resnet18-*.pth`, `resnet50-*.pth`, ...) -> models.resnet.ResNet variables.

The file is read without torch (`common.load_state_dict`, as torch.load(weights_only=True) would). Depth
and width are read off the keys (blocks per stage, whether blocks have a `conv3`, the stem's channels). Conv weights
become HWIO kernels; BatchNorm weight/bias go to `params` as scale/bias and running_mean/var to `batch_stats` as
mean/var. The classifier `fc.*` and the `num_batches_tracked` counters have no place in the trunk: they are logged
as unused, every other key must map one to one (common.convert raises on anything missing, extra or mis-shaped).

Also the helpers the other BatchNorm-network importers share: rules tagged with their collection,
`convert_variables` (both collections, nested) and `convert_collection` (one collection, flat, for `init_params`).
"""
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rsalign_jax.models import resnet
from rsalign_jax.weights import common

UNUSED = (r"fc\.(weight|bias)", r".*num_batches_tracked")
COLLECTIONS = ("params", "batch_stats")
Rules = list[tuple[str, common.Rule]]  # (collection, rule)


def conv_rule(flax: str, torch: str) -> tuple[str, common.Rule]:
  return "params", common.Rule(f"{flax}/kernel", f"{torch}.weight", common.conv_kernel)


def batch_norm_rules(flax: str, torch: str) -> Rules:
  return [("params", common.Rule(f"{flax}/scale", f"{torch}.weight")),
          ("params", common.Rule(f"{flax}/bias", f"{torch}.bias")),
          ("batch_stats", common.Rule(f"{flax}/mean", f"{torch}.running_mean")),
          ("batch_stats", common.Rule(f"{flax}/var", f"{torch}.running_var"))]


def convert_variables(state_dict, rules: Rules, expected: Mapping, unused: Sequence[str], what: str) -> dict:
  """Converts every rule and checks the result against `expected` {'params': ..., 'batch_stats': ...}."""
  common.log_unused(state_dict, unused, what)
  flat_rules = [common.Rule(f"{c}/{r.target}", r.sources, r.transform) for c, r in rules]
  return common.unflatten(common.convert(state_dict, flat_rules, expected, ignore=unused, what=what))


def convert_collection(state_dict, rules: Rules, collection: str, expected: Mapping | None, unused: Sequence[str],
                       what: str) -> dict[str, np.ndarray]:
  """One collection's rules -> flat {path: array} (an `init_params` loader's answer); other collections' keys skip."""
  if collection not in COLLECTIONS:
    raise ValueError(f"collection={collection!r}: expected one of {COLLECTIONS}")
  common.log_unused(state_dict, unused, what)
  others = [re.escape(k) for c, r in rules if c != collection for k in r.keys]
  return common.convert(state_dict, [r for c, r in rules if c == collection], expected,
                        ignore=(*unused, *others), what=what)


def resnet_attributes(state_dict: Mapping[str, np.ndarray], what: str = "checkpoint") -> dict:
  """{'depth', 'width'} of the torchvision ResNet whose keys these are."""
  if "conv1.weight" not in state_dict:
    raise common.WeightsMismatchError(f"{what}: no 'conv1.weight'; not a torchvision ResNet state dict")
  blocks = tuple(len({k.split(".")[1] for k in state_dict if k.startswith(f"layer{s}.")}) for s in range(1, 5))
  bottleneck = any(re.fullmatch(r"layer\d\.\d+\.conv3\.weight", k) for k in state_dict)
  for depth, sizes in resnet.STAGE_SIZES.items():
    if sizes == blocks and bottleneck == (depth in resnet.BOTTLENECK_DEPTHS):
      return dict(depth=depth, width=int(state_dict["conv1.weight"].shape[0]))
  kind = "Bottleneck" if bottleneck else "BasicBlock"
  raise common.WeightsMismatchError(f"{what}: {kind} blocks per stage {blocks} match no ResNet depth of "
                                    f"{sorted(resnet.STAGE_SIZES)}")


def resnet_rules(depth: int) -> Rules:
  rules = [conv_rule("conv1", "conv1"), *batch_norm_rules("bn1", "bn1")]
  convs = 3 if depth in resnet.BOTTLENECK_DEPTHS else 2
  for stage, num_blocks in enumerate(resnet.STAGE_SIZES[depth]):
    for block in range(num_blocks):
      flax, torch = f"layer{stage + 1}_{block}", f"layer{stage + 1}.{block}"
      for i in range(1, convs + 1):
        rules.append(conv_rule(f"{flax}/conv{i}", f"{torch}.conv{i}"))
        rules += batch_norm_rules(f"{flax}/bn{i}", f"{torch}.bn{i}")
      if block == 0 and (stage > 0 or convs == 3):
        rules += [conv_rule(f"{flax}/downsample_conv", f"{torch}.downsample.0"),
                  *batch_norm_rules(f"{flax}/downsample_bn", f"{torch}.downsample.1")]
  return rules


def load_resnet(path: str) -> tuple[dict, dict]:
  """A torchvision ResNet `.pth` -> (ResNet attributes {'depth', 'width'}, {'params': ..., 'batch_stats': ...})."""
  state_dict = common.load_state_dict(path)
  attributes = resnet_attributes(state_dict, path)
  model = resnet.ResNet(**attributes)
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  return attributes, convert_variables(state_dict, resnet_rules(attributes["depth"]), expected, UNUSED, path)


def load(checkpoint: str, expected: Mapping | None = None, collection: str = "params") -> dict[str, np.ndarray]:
  """`init_params` loader (format 'torchvision.load'): one collection of a ResNet `.pth`, as flat {path: array}."""
  state_dict = common.load_state_dict(checkpoint)
  depth = resnet_attributes(state_dict, checkpoint)["depth"]
  return convert_collection(state_dict, resnet_rules(depth), collection, expected, UNUSED, checkpoint)
