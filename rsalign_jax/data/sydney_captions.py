"""Sydney-Captions (Qu et al., CITS 2016): 613 images of Sydney (500 px TIFF, 7 scene classes), 5 captions each.

Read as published: `dataset.json` (Karpathy format, official split train 497 / val 58 / test 58) and `imgs/`
(`1.tif` ... `613.tif`). TIFF cannot be stored by tfds, so each image is re-encoded as an RGB PNG (pixel-exact for
8-bit RGB TIFF). There is no `scene` feature: the json carries no class and the file names are plain numbers, so
the 7 classes are not derivable from the published files. `train_papers`/`val_papers`: the papers' re-split (see
`karpathy.papers_split`) of the non-test images.
"""
from rsalign_jax.data import karpathy


class SydneyCaptions(karpathy.KarpathyBuilder):
  """Sydney-Captions from its published files; registered by tfds as `sydney_captions`."""

  JSON_NAME = "dataset.json"
  IMAGE_DIR = "imgs"
  AMFMN_NAME = "sydney"
  HOMEPAGE = "https://github.com/201528014227051/RSICD_optimal"
  CITATION = """@inproceedings{qu2016captions,
  title={Deep semantic understanding of high resolution remote sensing image},
  author={Qu, Bo and Li, Xuelong and Tao, Dacheng and Lu, Xiaoqiang},
  booktitle={International Conference on Computer, Information and Telecommunication Systems (CITS)},
  year={2016}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download Sydney-Captions (Sydney_captions) from the links in https://github.com/201528014227051/RSICD_optimal and
  set dataset.manual_dir to its folder, holding as published (nothing is converted):
    dataset.json   captions and the official train/val/test split (Karpathy format)
    imgs/          1.tif ... 613.tif
  """
