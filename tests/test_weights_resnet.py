"""torchvision ResNet importer: a plain-PyTorch copy of torchvision's ResNet (same state-dict keys), random weights
and BN statistics, saved as a .pth, imported, and compared with models.resnet.ResNet in eval mode."""
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsalign_jax.models import resnet
from rsalign_jax.weights import common
from rsalign_jax.weights import torchvision

torch = pytest.importorskip("torch")
nn = torch.nn
TOL = 1e-4


class TorchBasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or cin != planes:
      self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

  def forward(self, x):
    y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
    return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))


class TorchBottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(4 * planes)
    self.downsample = None
    if stride != 1 or cin != 4 * planes:
      self.downsample = nn.Sequential(nn.Conv2d(cin, 4 * planes, 1, stride, bias=False), nn.BatchNorm2d(4 * planes))

  def forward(self, x):
    y = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
    y = self.bn3(self.conv3(y))
    return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))


class TorchResNet(nn.Module):
  """torchvision.models.ResNet's layout and forward; `forward` returns the layer1..layer4 outputs."""

  def __init__(self, depth, width=64, num_classes=1000):
    super().__init__()
    block = TorchBottleneck if depth in resnet.BOTTLENECK_DEPTHS else TorchBasicBlock
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    cin = width
    for stage, blocks in enumerate(resnet.STAGE_SIZES[depth]):
      layer = []
      for b in range(blocks):
        layer.append(block(cin, width * 2**stage, 2 if stage > 0 and b == 0 else 1))
        cin = width * 2**stage * block.expansion
      setattr(self, f"layer{stage + 1}", nn.Sequential(*layer))
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    features = {}
    for stage in range(1, 5):
      x = features[f"f{stage}"] = getattr(self, f"layer{stage}")(x)
    return features


def _random_reference(depth, width, seed=0):
  torch.manual_seed(seed)
  model = TorchResNet(depth, width)
  for module in model.modules():
    if isinstance(module, nn.BatchNorm2d):
      n = module.num_features
      module.weight.data = 0.5 + torch.rand(n)
      module.bias.data = 0.1 * torch.randn(n)
      module.running_mean.data = 0.1 * torch.randn(n)
      module.running_var.data = 0.5 + torch.rand(n)
  return model.eval()


@pytest.mark.parametrize("depth", [18, 50])
def test_random_resnet_matches_torchvision_layout_reference(depth, tmp_path, caplog):
  reference = _random_reference(depth, width=8)
  torch.save(reference.state_dict(), tmp_path / "resnet.pth")
  with caplog.at_level(logging.INFO):
    attributes, variables = torchvision.load_resnet(str(tmp_path / "resnet.pth"))
  assert attributes == dict(depth=depth, width=8)
  assert "fc.bias, fc.weight" in caplog.text  # the classifier is reported as unused, not silently dropped
  images = np.random.default_rng(depth).normal(size=(2, 64, 64, 3)).astype(np.float32)
  ours = jax.jit(lambda v, x: resnet.ResNet(**attributes).apply(v, x, train=False))(variables, jnp.asarray(images))
  with torch.no_grad():
    theirs = reference(torch.from_numpy(images).permute(0, 3, 1, 2))
  for name, value in theirs.items():
    np.testing.assert_allclose(ours[name], value.permute(0, 2, 3, 1).numpy(), atol=TOL, rtol=0, err_msg=name)


def test_resnet50_param_count_equals_torchvision_without_fc():
  model = resnet.ResNet(50, 64)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  assert sum(math.prod(p.shape) for p in jax.tree.leaves(shapes["params"])) == 25_557_032 - (2048 * 1000 + 1000)
  assert model.out_features == 2048
  assert set(shapes["params"]["layer1_0"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample_conv",
                                               "downsample_bn"}


def test_init_params_loader_gives_one_collection(tmp_path):
  reference = _random_reference(18, width=8)
  torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
  _, variables = torchvision.load_resnet(str(tmp_path / "resnet18.pth"))
  stats = torchvision.load(str(tmp_path / "resnet18.pth"), expected=variables["batch_stats"], collection="batch_stats")
  assert stats.keys() == common.flatten(variables["batch_stats"]).keys()
  np.testing.assert_array_equal(stats["layer2_0/downsample_bn/var"], reference.layer2[0].downsample[1].running_var)
  params = torchvision.load(str(tmp_path / "resnet18.pth"), expected=variables["params"])
  np.testing.assert_array_equal(params["layer3_1/conv2/kernel"],
                                reference.layer3[1].conv2.weight.detach().numpy().transpose(2, 3, 1, 0))


def test_mismatches_are_refused_with_every_key_named(tmp_path):
  state_dict = _random_reference(18, width=8).state_dict()
  del state_dict["layer4.1.bn2.running_var"]
  state_dict["layer1.0.conv1.weight"] = torch.zeros(8, 8, 5, 5)
  torch.save(state_dict, tmp_path / "broken.pth")
  with pytest.raises(common.WeightsMismatchError) as error:
    torchvision.load_resnet(str(tmp_path / "broken.pth"))
  message = str(error.value)
  assert "missing in checkpoint (1):\n    layer4.1.bn2.running_var" in message
  assert "'layer1.0.conv1.weight' (8, 8, 5, 5) -> 'params/layer1_0/conv1/kernel' (5, 5, 8, 8)" in message
  torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(8, 8, 3, 3)},
             tmp_path / "odd.pth")
  with pytest.raises(common.WeightsMismatchError, match=r"blocks per stage \(1, 0, 0, 0\) match no ResNet depth"):
    torchvision.load_resnet(str(tmp_path / "odd.pth"))
  with pytest.raises(FileNotFoundError, match="no such checkpoint"):
    torchvision.load_resnet(str(tmp_path / "absent.pth"))
