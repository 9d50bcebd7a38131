"""UCM-Captions (Qu et al., CITS 2016): the 2,100 UC Merced land-use images (256 px TIFF), 5 captions each.

Read as published: `dataset.json` (Karpathy format, official split train 1,680 / val 210 / test 210) and `imgs/`
(`1.tif` ... `2100.tif`). TIFF cannot be stored by tfds, so each image is re-encoded as an RGB PNG (pixel-exact for
8-bit RGB TIFF). `scene` is the UC Merced class: the 21 classes in alphabetical order, 100 consecutive image ids
(`imgid` 0-2099, file `<imgid + 1>.tif`) each. `train_papers`/`val_papers`: the papers' re-split (see
`karpathy.papers_split`) of the non-test images.
"""
from rsalign_jax.data import karpathy

SCENE_CLASSES = (
    "agricultural", "airplane", "baseballdiamond", "beach", "buildings", "chaparral", "denseresidential", "forest",
    "freeway", "golfcourse", "harbor", "intersection", "mediumresidential", "mobilehomepark", "overpass",
    "parkinglot", "river", "runway", "sparseresidential", "storagetanks", "tenniscourt")
IMAGES_PER_CLASS = 100
NUM_IMAGES = len(SCENE_CLASSES) * IMAGES_PER_CLASS


class UcmCaptions(karpathy.KarpathyBuilder):
  """UCM-Captions from its published files; registered by tfds as `ucm_captions`."""

  JSON_NAME = "dataset.json"
  IMAGE_DIR = "imgs"
  AMFMN_NAME = "ucm"
  SCENE_CLASSES = SCENE_CLASSES
  HOMEPAGE = "https://github.com/201528014227051/RSICD_optimal"
  CITATION = """@inproceedings{qu2016captions,
  title={Deep semantic understanding of high resolution remote sensing image},
  author={Qu, Bo and Li, Xuelong and Tao, Dacheng and Lu, Xiaoqiang},
  booktitle={International Conference on Computer, Information and Telecommunication Systems (CITS)},
  year={2016}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download UCM-Captions (UCM_captions) from the links in https://github.com/201528014227051/RSICD_optimal and set
  dataset.manual_dir to its folder, holding as published (nothing is converted):
    dataset.json   captions and the official train/val/test split (Karpathy format)
    imgs/          1.tif ... 2100.tif
  """

  def scene_of(self, filename, image_id, where):
    del filename
    if not 0 <= image_id < NUM_IMAGES:
      raise ValueError(f"{where}: imgid {image_id} is outside 0..{NUM_IMAGES - 1}, so its UC Merced class "
                       f"({IMAGES_PER_CLASS} consecutive ids per class) is unknown")
    return image_id // IMAGES_PER_CLASS

  @classmethod
  def scene_of_file(cls, filename, where):
    """The class of file `<n>.tif`, image n of the UC Merced order (imgid n - 1), as the split files name them."""
    number = filename.partition(".")[0]
    if not (number.isdigit() and 1 <= int(number) <= NUM_IMAGES):
      raise ValueError(f"{where}: file name {filename!r} is not <n>.tif with n in 1..{NUM_IMAGES}, so its UC Merced "
                       f"class ({IMAGES_PER_CLASS} consecutive numbers per class) is unknown")
    return (int(number) - 1) // IMAGES_PER_CLASS
