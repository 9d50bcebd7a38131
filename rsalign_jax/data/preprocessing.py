"""Image preprocessing ops, composed from a big_vision-style string such as
`decode|resize(278)|random_rotate(0, 90)|random_crop(256)|normalize`.

Each op name `x` resolves to the factory `get_x(*args, **kwargs)` in this module (registry by name, no table);
the factory returns `op(image, rng) -> image` working on numpy HWC arrays (uint8 until `normalize`). `rng` is a
numpy Generator supplied per example by grain, so augmentation is deterministic and resumable.
"""
import ast
import io
import sys

import numpy as np
import PIL.Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIHEDRAL_VIEWS = 8  # the symmetries of the square: rotations by 90 degrees, and their mirror images


def parse(spec):
  """Returns a function `(image, rng) -> image` applying the ops of `spec` in order."""
  ops = [_build_op(part.strip()) for part in spec.split("|") if part.strip()]

  def apply(image, rng):
    for op in ops:
      image = op(image, rng)
    return image

  return apply


def _build_op(text):
  try:
    call = ast.parse(text if "(" in text else f"{text}()", mode="eval").body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
      raise SyntaxError("not an op call")
    args = [ast.literal_eval(a) for a in call.args]
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
  except (SyntaxError, ValueError) as e:
    raise ValueError(f"preprocessing op {text!r}: expected `name` or `name(literal args)` ({e})") from None
  factory = getattr(sys.modules[__name__], f"get_{call.func.id}", None)
  if factory is None:
    known = sorted(n[4:] for n in dir(sys.modules[__name__]) if n.startswith("get_"))
    raise ValueError(f"unknown preprocessing op {call.func.id!r}; known ops: {known}")
  return factory(*args, **kwargs)


def get_decode():
  """Encoded image bytes -> uint8 RGB array."""
  def op(image, rng):
    del rng
    if isinstance(image, np.ndarray):
      return image
    with PIL.Image.open(io.BytesIO(image)) as im:
      return np.asarray(im.convert("RGB"))
  return op


def get_resize(size):
  """Bilinear resize to exactly (size, size), as the papers' `transforms.Resize((s, s))`."""
  def op(image, rng):
    del rng
    return np.asarray(PIL.Image.fromarray(image).resize((size, size), PIL.Image.BILINEAR))
  return op


def get_random_rotate(min_degrees, max_degrees):
  """Rotation by U[min, max] degrees about the centre, nearest neighbour, black fill (HVSA's RandomRotation)."""
  def op(image, rng):
    angle = rng.uniform(min_degrees, max_degrees)
    rotated = PIL.Image.fromarray(image).rotate(angle, resample=PIL.Image.NEAREST, expand=False, fillcolor=0)
    return np.asarray(rotated)
  return op


def get_random_crop(size):
  """A random size x size crop (offsets uniform over all valid positions)."""
  def op(image, rng):
    h, w = image.shape[:2]
    if h < size or w < size:
      raise ValueError(f"random_crop({size}): image is only {h}x{w}")
    top, left = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
    return image[top:top + size, left:left + size]
  return op


def get_central_crop(size):
  def op(image, rng):
    del rng
    h, w = image.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return image[top:top + size, left:left + size]
  return op


def get_flip_lr(probability=0.5):
  def op(image, rng):
    return image[:, ::-1] if rng.random() < probability else image
  return op


def get_random_rot90():
  """A uniformly random multiple of 90 degrees: aerial images have no canonical orientation."""
  def op(image, rng):
    return np.rot90(image, k=rng.integers(4))
  return op


def get_random_view():
  """One of an array's leading-axis views, uniformly: cached trunk outputs (V, ...) of V augmented views
  (`rsalign_jax.trunk_cache`), as float32."""
  def op(views, rng):
    return np.asarray(views[rng.integers(len(views))], np.float32)
  return op


def get_view(k=0):
  """View k of cached trunk outputs (V, ...) as float32 (k=0: the plain, un-augmented view)."""
  def op(views, rng):
    del rng
    return np.asarray(views[k], np.float32)
  return op


def get_views(n):
  """The first n views of cached trunk outputs (V, ...) as float32 (n, ...): the dihedral views of test-time
  augmentation (`config.eval_views`)."""
  def op(views, rng):
    del rng
    if len(views) < n:
      raise ValueError(f"views({n}): the cached trunk outputs hold only {len(views)} views of each image")
    return np.asarray(views[:n], np.float32)
  return op


def dihedral_view(image: np.ndarray, k: int) -> np.ndarray:
  """View k of an HWC image: rotation by 90k degrees (k < 4), then mirrored left-right for k >= 4."""
  rotated = np.rot90(image, k % 4)
  return np.ascontiguousarray(rotated[:, ::-1] if k >= 4 else rotated)


def get_dihedral_views(n):
  """An HWC image -> its first n dihedral views (n, H, W, C) (`dihedral_view`): test-time augmentation of aerial
  images, which have no canonical orientation."""
  if not 1 <= n <= DIHEDRAL_VIEWS:
    raise ValueError(f"dihedral_views({n}): the square has {DIHEDRAL_VIEWS} symmetries; expected 1..{DIHEDRAL_VIEWS}")
  def op(image, rng):
    del rng
    return np.stack([dihedral_view(image, k) for k in range(n)])
  return op


def get_normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """uint8 [0, 255] -> float32 (x / 255 - mean) / std, ImageNet statistics by default."""
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

  def op(image, rng):
    del rng
    return ((image.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
  return op
