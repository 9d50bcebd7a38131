"""RSITMD (Yuan et al., TGRS 2022): 4,743 images of 256 px (TIFF), 5 fine-grained captions and 1-5 keywords each.

Read as published: `dataset_RSITMD.json` (Karpathy format plus a `keywords` list per image) and `images/`. TIFF
cannot be stored by tfds, so each image is re-encoded as an RGB PNG (pixel-exact for 8-bit RGB TIFF). `scene` is
one of the 33 classes of the `<class>_<n>.tif` file names. `train_papers`/`val_papers`: the papers' re-split (see
`karpathy.papers_split`) of the non-test images (4,291 in AMFMN's `train_filename.txt`: 3,861 / 430 at p = 0.9).
"""
from rsalign_jax.data import karpathy

SCENE_CLASSES = (
    "airport", "bareland", "baseballfield", "beach", "boat", "bridge", "center", "church", "commercial",
    "denseresidential", "desert", "farmland", "forest", "industrial", "intersection", "meadow", "mediumresidential",
    "mountain", "park", "parking", "plane", "playground", "pond", "port", "railwaystation", "resort", "river", "school",
    "sparseresidential", "square", "stadium", "storagetanks", "viaduct")


class Rsitmd(karpathy.KarpathyBuilder):
  """RSITMD from its published files; registered by tfds as `rsitmd`."""

  JSON_NAME = "dataset_RSITMD.json"
  IMAGE_DIR = "images"
  AMFMN_NAME = "rsitmd"
  SCENE_CLASSES = SCENE_CLASSES
  WITH_KEYWORDS = True
  HOMEPAGE = "https://github.com/xiaoyuan1996/AMFMN"
  CITATION = """@article{yuan2022rsitmd,
  title={Exploring a Fine-Grained Multiscale Method for Cross-Modal Remote Sensing Image Retrieval},
  author={Yuan, Zhiqiang and Zhang, Wenkai and Fu, Kun and Li, Xuan and Deng, Chubo and Wang, Hongqi and Sun, Xian},
  journal={IEEE Transactions on Geoscience and Remote Sensing},
  year={2022}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download RSITMD from the links in the RSITMD section of https://github.com/xiaoyuan1996/AMFMN and set
  dataset.manual_dir to a folder holding, as published (nothing is converted):
    dataset_RSITMD.json  captions, keywords and the official split (Karpathy format)
    images/              the images named in the json (airport_1.tif, ...)
  """
