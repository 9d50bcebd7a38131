"""RS datasets as the retrieval papers use them: the AMFMN/HVSA split files (docs/METHODS.md §1.1) and the images.

One builder config per dataset the AMFMN release ships split files for, named as its folder there
(`data/<name>_precomp`): `rsicd`, `rsitmd`, `ucm`, `sydney` (each also `<name>_skip_missing_images`), selected as
`--config.dataset.name=amfmn_splits/<name>`. `manual_dir` is that folder, or a folder holding it (AMFMN's `data/`):
  * `train_caps.txt` / `test_caps.txt`: one caption per line, 5 consecutive lines per image;
  * `train_filename.txt`: one line per image; `test_filename.txt`: five identical lines per image;
  * `images/` (as AMFMN places them) or the dataset's published image folder (`RSICD_images/`, `imgs/`).
Splits: `train` and `test` as in the files (no official val: the papers draw it from train), and
`train_papers`/`val_papers`, the papers' re-split of `train` (see `karpathy.papers_split`; RSICD 8,845 / 983,
RSITMD 3,861 / 430). `image_id` numbers the images in file order, train first, then test. `scene` is derived from
the file names as by the dataset's own builder (`KarpathyBuilder.scene_of_file`); Sydney has none.

Blank caption lines (RSITMD train has 20: 4 images with 5 blank lines) are kept as empty captions, as the papers
train on them (docs/METHODS.md §5 item 12: a zero-token caption, which HVSA encodes with length 1); each is counted as
`blank_caption_kept` in the repairs. Lone "." captions (3 in RSICD train) are kept as they are.
"""
import dataclasses

import tensorflow_datasets as tfds

from rsalign_jax.data import karpathy
from rsalign_jax.data import rsicd
from rsalign_jax.data import rsitmd
from rsalign_jax.data import sydney_captions
from rsalign_jax.data import ucm_captions

SPLIT_FILES = ("train_caps.txt", "train_filename.txt", "test_caps.txt", "test_filename.txt")
BLANK_KEPT = "blank_caption_kept"


@dataclasses.dataclass(eq=False)
class AmfmnSplitsConfig(karpathy.CaptionBuilderConfig):
  """One dataset's split files; `published` is the dataset's own builder, which gives its image folder, scene
  classes and how a file name gives the class."""
  published: type[karpathy.KarpathyBuilder] | None = None

  @property
  def precomp_dir(self):
    """The folder of the dataset's split files in AMFMN's `data/`."""
    return f"{self.published.AMFMN_NAME}_precomp"

  @property
  def image_dirs(self):
    """The image folders looked for next to the split files, first found wins."""
    return tuple(dict.fromkeys(("images", self.published.IMAGE_DIR)))

  @property
  def scene_of(self):
    """`scene_of(filename, where)`, the scene class of an image, or None for a dataset without scene classes."""
    return self.published.scene_of_file if self.published.SCENE_CLASSES else None


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


def read_split_files(split_dir, image_dir, scene_of=None):
  """Reads the four split files in `split_dir` into {"train": [Record], "test": [Record]}; `scene_of(filename,
  where)` gives each image's `scene` label, if any."""
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
      labels = {"scene": scene_of(filename, where)} if scene_of else {}
      repairs = (BLANK_KEPT,) * texts.count("")
      splits[split].append(karpathy.Record(image_dir / filename, filename, image_id, texts, (), labels, repairs))
      image_id += 1
  return splits


class AmfmnSplits(karpathy.CaptionDatasetBuilder):
  """RS datasets from the AMFMN/HVSA split files; registered by tfds as `amfmn_splits` (a config per dataset)."""

  BUILDER_CONFIGS = karpathy.with_skip_missing_variants([
      AmfmnSplitsConfig(name=published.AMFMN_NAME, description=f"{published.name} from the AMFMN/HVSA split files.",
                        published=published)
      for published in (rsicd.Rsicd, rsitmd.Rsitmd, ucm_captions.UcmCaptions, sydney_captions.SydneyCaptions)])
  DEFAULT_CONFIG_NAME = "rsicd"
  HOMEPAGE = "https://github.com/xiaoyuan1996/AMFMN"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Set dataset.manual_dir to the folder of the dataset's split files in AMFMN (https://github.com/xiaoyuan1996/AMFMN,
  AMFMN/data/<name>_precomp, name rsicd, rsitmd, ucm or sydney), or to AMFMN/data itself, holding the dataset's
  images (see the dataset's own builder for where they are published):
    train_caps.txt  train_filename.txt  test_caps.txt  test_filename.txt
    images/         (or the published image folder: RSICD_images/, imgs/) the images the split files name
  """

  def _label_features(self):
    scene_classes = self.builder_config.published.SCENE_CLASSES
    return {"scene": tfds.features.ClassLabel(names=scene_classes)} if scene_classes else {}

  def layout(self):
    config = self.builder_config
    image_dirs = " or ".join(d + "/" for d in config.image_dirs)
    return (f"the AMFMN/HVSA split files ({', '.join(SPLIT_FILES)}) and {image_dirs} in manual_dir or in its "
            f"{config.precomp_dir}/")

  def _read_splits(self, manual_dir):
    config = self.builder_config
    split_dir = manual_dir
    if not (manual_dir / SPLIT_FILES[0]).is_file() and (manual_dir / config.precomp_dir).is_dir():
      split_dir = manual_dir / config.precomp_dir
    missing = [name for name in SPLIT_FILES if not (split_dir / name).is_file()]
    image_dir = next((split_dir / d for d in config.image_dirs if (split_dir / d).is_dir()), None)
    if missing or image_dir is None:
      problem = f"missing {', '.join(missing)}" if missing else "no image folder"
      hint = ""
      if (split_dir / config.published.JSON_NAME).is_file():
        hint = (f" {config.published.JSON_NAME} is the published layout: use "
                f"--config.dataset.name={config.published.name}")
      raise FileNotFoundError(f"{split_dir}: {problem}; {self.dataset_name} expects {self.layout()} "
                              f"(it holds: {karpathy.listing(split_dir)}).{hint}")
    return read_split_files(split_dir, image_dir, config.scene_of)
