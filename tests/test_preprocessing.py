"""Preprocessing ops: parsing, shapes, HVSA's rotation/crop, determinism from the rng, normalisation values."""
import io

import numpy as np
import PIL.Image
import pytest

from rsalign_jax.data import preprocessing


def png_bytes(array):
  buf = io.BytesIO()
  PIL.Image.fromarray(array).save(buf, "PNG")
  return buf.getvalue()


def test_decode_resize_normalize_pipeline_values():
  image = np.full((10, 12, 3), 255, np.uint8)
  out = preprocessing.parse("decode|resize(8)|normalize")(png_bytes(image), np.random.default_rng(0))
  assert out.shape == (8, 8, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0], (1.0 - np.array(preprocessing.IMAGENET_MEAN)) /
                             np.array(preprocessing.IMAGENET_STD), rtol=1e-6)


def test_hvsa_augmentation_is_deterministic_given_the_rng_and_fills_black():
  image = np.full((64, 64, 3), 200, np.uint8)
  augment = preprocessing.parse("resize(70)|random_rotate(0, 90)|random_crop(64)")
  a = augment(image, np.random.default_rng(7))
  b = augment(image, np.random.default_rng(7))
  np.testing.assert_array_equal(a, b)
  assert a.shape == (64, 64, 3)
  rotated = preprocessing.get_random_rotate(45, 45)(image, np.random.default_rng(0))
  assert rotated[0, 0].tolist() == [0, 0, 0] and rotated[32, 32].tolist() == [200, 200, 200]


def test_random_crop_covers_every_offset():
  image = np.arange(5 * 5).reshape(5, 5, 1).astype(np.uint8)
  crop = preprocessing.get_random_crop(3)
  rng = np.random.default_rng(0)
  corners = {int(crop(image, rng)[0, 0, 0]) for _ in range(300)}
  assert corners == {r * 5 + c for r in range(3) for c in range(3)}
  with pytest.raises(ValueError, match="random_crop\\(6\\): image is only 5x5"):
    crop = preprocessing.get_random_crop(6)(image, rng)


def test_flip_and_rot90_are_exact_permutations():
  image = np.arange(2 * 3 * 1).reshape(2, 3, 1).astype(np.uint8)
  np.testing.assert_array_equal(preprocessing.get_flip_lr(1.0)(image, np.random.default_rng(0)), image[:, ::-1])
  rotated = preprocessing.get_random_rot90()(image, np.random.default_rng(0))
  assert sorted(rotated.ravel()) == sorted(image.ravel())


@pytest.mark.parametrize("spec, message", [
    ("decode|sharpen(2)", "unknown preprocessing op 'sharpen'"),
    ("resize(size=)", "expected `name` or `name\\(literal args\\)`"),
    ("resize(os.system)", "expected `name` or"),
])
def test_parse_errors(spec, message):
  with pytest.raises(ValueError, match=message):
    preprocessing.parse(spec)


def test_dihedral_views_are_the_eight_symmetries_of_the_square():
  image = np.arange(2 * 3 * 3).reshape(3, 3, 2)
  views = [preprocessing.dihedral_view(image, k) for k in range(8)]
  np.testing.assert_array_equal(views[1], np.rot90(image))
  np.testing.assert_array_equal(views[4], image[:, ::-1])
  np.testing.assert_array_equal(views[6], np.rot90(image, 2)[:, ::-1])
  assert len({v.tobytes() for v in views}) == 8
  stacked = preprocessing.parse("dihedral_views(8)")(image, None)
  np.testing.assert_array_equal(stacked, np.stack(views))


def test_views_of_cached_outputs_and_their_errors():
  cached = np.arange(4 * 2, dtype=np.float16).reshape(4, 2)
  taken = preprocessing.parse("views(3)")(cached, None)
  assert taken.dtype == np.float32
  np.testing.assert_array_equal(taken, cached[:3])
  with pytest.raises(ValueError, match=r"views\(5\): the cached trunk outputs hold only 4 views"):
    preprocessing.parse("views(5)")(cached, None)
  with pytest.raises(ValueError, match=r"dihedral_views\(9\): the square has 8 symmetries; expected 1..8"):
    preprocessing.parse("dihedral_views(9)")
