"""RSICD and RSITMD as the RS retrieval papers use them: the AMFMN/HVSA split files (METHODS.md 1.1) and the images.

`manual_dir` holds the four split files as released with AMFMN (`data/<ds>_precomp/`) and the images:
  * `train_caps.txt` / `test_caps.txt`: one caption per line, 5 consecutive lines per image;
  * `train_filename.txt`: one line per image; `test_filename.txt`: five identical lines per image;
  * `images/` (config `rsitmd`), or `images/` or `RSICD_images/` (config `rsicd`).
Splits: `train` and `test` as in the files (no official val: the papers draw it from train), and
`train_papers`/`val_papers`, the papers' re-split of `train` (see `karpathy.papers_split`; RSICD 8,845 / 983,
RSITMD 3,861 / 430). `image_id` numbers the images in file order, train first, then test.

Blank caption lines (RSITMD train has 20: 4 images with 5 blank lines) are kept as empty captions, as the papers
train on them (METHODS.md 5 item 12: a zero-token caption, which HVSA encodes with length 1); each is counted as
`blank_caption_kept` in the repairs. Lone "." captions (3 in RSICD train) are kept as they are.
"""
import dataclasses

import tensorflow_datasets as tfds

from rsalign_jax.data import karpathy
from rsalign_jax.data import rsicd
from rsalign_jax.data import rsitmd

SPLIT_FILES = ("train_caps.txt", "train_filename.txt", "test_caps.txt", "test_filename.txt")
BLANK_KEPT = "blank_caption_kept"


@dataclasses.dataclass(eq=False)
class AmfmnSplitsConfig(karpathy.CaptionBuilderConfig):
  """The image folders to look for (first found wins) and the classes of `<class>_<n>` file names."""
  image_dirs: tuple[str, ...] = ("images",)
  scene_classes: tuple[str, ...] = ()


def _lines(path):
  return karpathy.read_text(path).splitlines()


def _image_names(path, lines_per_image):
  """The file names of `*_filename.txt`, one per image, checking that each fills `lines_per_image` equal lines."""
  lines = [line.strip() for line in _lines(path)]
  for number, line in enumerate(lines, 1):
    if not line:
      raise ValueError(f"{path}:{number}: empty line; expected an image file name")
  if len(lines) % lines_per_image:
    raise ValueError(f"{path}: {len(lines)} lines is not a multiple of {lines_per_image}; expected {lines_per_image} "
                     f"identical lines per image")
  names = lines[::lines_per_image]
  for image, name in enumerate(names):
    first = image * lines_per_image
    for number in range(first + 1, first + lines_per_image):
      if lines[number] != name:
        raise ValueError(f"{path}:{number + 1}: {lines[number]!r} differs from {name!r} on line {first + 1}; expected "
                         f"{lines_per_image} identical lines per image")
  return names


def read_split_files(split_dir, image_dir, scene_classes):
  """Reads the four split files in `split_dir` into {"train": [Record], "test": [Record]}."""
  names = {"train": _image_names(split_dir / "train_filename.txt", 1),
           "test": _image_names(split_dir / "test_filename.txt", karpathy.NUM_CAPTIONS)}
  splits, image_id = {}, 0
  for split, filenames in names.items():
    caps_path = split_dir / f"{split}_caps.txt"
    captions = [line.strip() for line in _lines(caps_path)]
    if len(captions) != karpathy.NUM_CAPTIONS * len(filenames):
      raise ValueError(f"{caps_path} has {len(captions)} captions but {split_dir / f'{split}_filename.txt'} names "
                       f"{len(filenames)} images; expected {karpathy.NUM_CAPTIONS} captions per image "
                       f"({karpathy.NUM_CAPTIONS * len(filenames)})")
    splits[split] = []
    for index, filename in enumerate(filenames):
      first = karpathy.NUM_CAPTIONS * index
      texts = tuple(captions[first:first + karpathy.NUM_CAPTIONS])
      where = f"{split_dir / f'{split}_filename.txt'}: {filename}"
      labels = {"scene": karpathy.scene_from_prefix(filename, scene_classes, where)}
      repairs = (BLANK_KEPT,) * texts.count("")
      splits[split].append(karpathy.Record(image_dir / filename, filename, image_id, texts, (), labels, repairs))
      image_id += 1
  return splits


class AmfmnSplits(karpathy.CaptionDatasetBuilder):
  """RSICD/RSITMD from the AMFMN/HVSA split files; registered by tfds as `amfmn_splits` (configs rsicd, rsitmd)."""

  BUILDER_CONFIGS = karpathy.with_skip_missing_variants([
      AmfmnSplitsConfig(name="rsicd", description="RSICD: 9,828 train / 1,093 test images.",
                        image_dirs=("images", "RSICD_images"), scene_classes=rsicd.SCENE_CLASSES),
      AmfmnSplitsConfig(name="rsitmd", description="RSITMD: 4,291 train / 452 test images (TIFF, stored as PNG).",
                        image_dirs=("images",), scene_classes=rsitmd.SCENE_CLASSES),
  ])
  DEFAULT_CONFIG_NAME = "rsicd"
  HOMEPAGE = "https://github.com/xiaoyuan1996/AMFMN"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Set dataset.manual_dir to a folder holding the split files of AMFMN (https://github.com/xiaoyuan1996/AMFMN,
  AMFMN/data/rsicd_precomp or rsitmd_precomp) and the dataset's images (RSICD or RSITMD, see the rsicd and rsitmd
  builders for where they are published):
    train_caps.txt  train_filename.txt  test_caps.txt  test_filename.txt
    images/         (or RSICD_images/ for the rsicd config) the images the split files name
  """

  def _label_features(self):
    return {"scene": tfds.features.ClassLabel(names=self.builder_config.scene_classes)}

  def _read_splits(self, manual_dir):
    for name in SPLIT_FILES:
      if not (manual_dir / name).is_file():
        raise FileNotFoundError(f"{manual_dir / name}: file not found; {self.name} needs {', '.join(SPLIT_FILES)} "
                                f"and an image folder in manual_dir")
    image_dirs = self.builder_config.image_dirs
    image_dir = next((manual_dir / d for d in image_dirs if (manual_dir / d).is_dir()), None)
    if image_dir is None:
      raise FileNotFoundError(f"{manual_dir}: no image folder; expected {' or '.join(d + '/' for d in image_dirs)} "
                              f"next to the split files")
    return read_split_files(manual_dir, image_dir, self.builder_config.scene_classes)
