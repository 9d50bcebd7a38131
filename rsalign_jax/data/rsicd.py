"""RSICD (Lu et al., TGRS 2018): 10,921 Google Earth / Baidu Map images of 224 px (JPEG), 5 captions each.

Read as published: `dataset_rsicd.json` (Karpathy format, official split train 8,734 / val 1,094 / test 1,093) and
`RSICD_images/`. Images are stored as their original JPEG bytes. `scene` is one of the 30 classes of the
`<class>_<n>.jpg` file names; RSICD's numeric names (`00001.jpg`, ...) have no class (scene -1). Many images repeat
one sentence over their 5 slots (as published). `train_papers`/`val_papers`: the papers' re-split (see
`karpathy.papers_split`) of the non-test images, which are exactly the 9,828 images of AMFMN's `train_filename.txt`.
"""
from rsalign_jax.data import karpathy

SCENE_CLASSES = (
    "airport", "bareland", "baseballfield", "beach", "bridge", "center", "church", "commercial", "denseresidential",
    "desert", "farmland", "forest", "industrial", "meadow", "mediumresidential", "mountain", "park", "parking",
    "playground", "pond", "port", "railwaystation", "resort", "river", "school", "sparseresidential", "square",
    "stadium", "storagetanks", "viaduct")


class Rsicd(karpathy.KarpathyBuilder):
  """RSICD from its published files; registered by tfds as `rsicd`."""

  JSON_NAME = "dataset_rsicd.json"
  IMAGE_DIR = "RSICD_images"
  AMFMN_NAME = "rsicd"
  SCENE_CLASSES = SCENE_CLASSES
  HOMEPAGE = "https://github.com/201528014227051/RSICD_optimal"
  CITATION = """@article{lu2018rsicd,
  title={Exploring Models and Data for Remote Sensing Image Caption Generation},
  author={Lu, Xiaoqiang and Wang, Binqiang and Zheng, Xiangtao and Li, Xuelong},
  journal={IEEE Transactions on Geoscience and Remote Sensing},
  year={2018}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download RSICD from the links in https://github.com/201528014227051/RSICD_optimal and set dataset.manual_dir to a
  folder holding, as published (nothing is converted):
    dataset_rsicd.json   captions and the official train/val/test split (Karpathy format)
    RSICD_images/        the images named in the json (airport_1.jpg, ..., 00001.jpg, ...)
  """
