"""torchvision's ResNets (BasicBlock 18/34, Bottleneck 50/101/152) in NHWC Flax, returning the four stage features.

Module and parameter names follow torchvision's state dict so an importer maps them one to one:
`conv1`, `bn1`, `layer{s}_{b}/{conv1,bn1,conv2,bn2}` (plus `conv3,bn3` in a Bottleneck), and
`layer{s}_{b}/downsample_{conv,bn}` for `layer{s}.{b}.downsample.{0,1}`. A Bottleneck strides in its 3x3 conv
(torchvision's "ResNet v1.5"). Conv kernels are HWIO (torchvision's OIHW transposed); BatchNorm weight/bias are
`scale`/`bias` in params and running_mean/running_var are `mean`/`var` in batch_stats.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rsalign_jax.models import convolution, pooling
from rsalign_jax.models.layers import batch_norm

STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
BOTTLENECK_DEPTHS = (50, 101, 152)

# torchvision's conv init: kaiming_normal_(mode='fan_out', nonlinearity='relu'), an untruncated normal.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Conv:
  """Bias-free conv with PyTorch's symmetric padding kernel // 2 (Flax 'SAME' pads asymmetrically at stride 2);
  its kernel gradient is `convolution.conv_general_dilated`'s."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=conv_init, dtype=dtype, conv_general_dilated=convolution.conv_general_dilated, name=name)


def torch_max_pool(x: jax.Array) -> jax.Array:
  """PyTorch's MaxPool2d(3, stride=2, padding=1): the padding is -inf, so it never wins over real values."""
  return pooling.max_pool(x, kernel=3, stride=2, padding=1)


class BasicBlock(nn.Module):
  """Two 3x3 convs with a residual; a 1x1 conv + BN projects the shortcut when the shape changes."""
  features: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    y = conv(self.features, 3, self.stride, self.dtype, "conv1")(x)
    y = nn.relu(batch_norm(train, self.dtype, "bn1")(y))
    y = conv(self.features, 3, 1, self.dtype, "conv2")(y)
    y = batch_norm(train, self.dtype, "bn2")(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, self.stride, self.dtype, "downsample_conv")(x)
      x = batch_norm(train, self.dtype, "downsample_bn")(x)
    return nn.relu(y + x)


class Bottleneck(nn.Module):
  """1x1 reduce -> 3x3 (strided) -> 1x1 expand to 4 * features, with a residual; projected shortcut as above."""
  features: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    y = nn.relu(batch_norm(train, self.dtype, "bn1")(conv(self.features, 1, 1, self.dtype, "conv1")(x)))
    y = nn.relu(batch_norm(train, self.dtype, "bn2")(conv(self.features, 3, self.stride, self.dtype, "conv2")(y)))
    y = batch_norm(train, self.dtype, "bn3")(conv(4 * self.features, 1, 1, self.dtype, "conv3")(y))
    if self.stride != 1 or x.shape[-1] != 4 * self.features:
      x = conv(4 * self.features, 1, self.stride, self.dtype, "downsample_conv")(x)
      x = batch_norm(train, self.dtype, "downsample_bn")(x)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """ResNet trunk without the classifier: stem, then stages of `width * 2**s` channels (x4 out of a Bottleneck).

  Returns {'f1', 'f2', 'f3', 'f4'}, the outputs of layer1..layer4 (strides 4, 8, 16, 32) in `dtype`, up to
  `last_stage` (a call that needs only early stages skips the later ones; the parameters are the same).
  """
  depth: int = 18
  width: int = 64
  dtype: Any = jnp.float32

  @property
  def out_features(self) -> int:
    """Channels of f4."""
    return self.width * 8 * (4 if self.depth in BOTTLENECK_DEPTHS else 1)

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool, last_stage: int = 4) -> dict[str, jax.Array]:
    if self.depth not in STAGE_SIZES:
      raise ValueError(f"ResNet: depth={self.depth}; expected one of {sorted(STAGE_SIZES)}")
    block_cls = Bottleneck if self.depth in BOTTLENECK_DEPTHS else BasicBlock
    x = conv(self.width, 7, 2, self.dtype, "conv1")(images)
    x = nn.relu(batch_norm(train, self.dtype, "bn1")(x))
    x = torch_max_pool(x)
    features = {}
    for stage, num_blocks in enumerate(STAGE_SIZES[self.depth][:last_stage]):
      for block in range(num_blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        x = block_cls(self.width * 2**stage, stride, self.dtype, name=f"layer{stage + 1}_{block}")(x, train=train)
      features[f"f{stage + 1}"] = x
    return features
