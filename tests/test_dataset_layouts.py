"""Each dataset in the AMFMN/HVSA split-file layout, selected by name as a run selects it, and the one-line errors
for a manual_dir that is absent, in the other layout or missing images.

The datasets are tiny copies of each release's layout written into tmp_path: the split files name images as the
real ones do (RSICD `<class>_<n>.jpg` and numeric names, RSITMD `<class>_<n>.tif`, UCM and Sydney `<n>.tif`).
"""
import json
import re

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from rsalign_jax.data import amfmn_splits
from rsalign_jax.data import karpathy
from rsalign_jax.data import rsicd
from rsalign_jax.data import sources
from rsalign_jax.data import ucm_captions

# AMFMN name -> (train file names, test file names, the published image folder, image format, scene of each image)
LAYOUTS = {
    "rsicd": (["airport_1.jpg", "00002.jpg"], ["viaduct_3.jpg"], "RSICD_images", "JPEG",
              ["airport", None, "viaduct"]),
    "rsitmd": (["boat_1.tif", "plane_2.tif"], ["intersection_3.tif"], "images", "TIFF",
               ["boat", "plane", "intersection"]),
    "ucm": (["1.tif", "101.tif"], ["2100.tif"], "imgs", "TIFF", ["agricultural", "airplane", "tenniscourt"]),
    "sydney": (["1.tif", "2.tif"], ["613.tif"], "imgs", "TIFF", None),
}
SPLIT_FILE_PATTERN = r"\(train_caps\.txt, train_filename\.txt, test_caps\.txt, test_filename\.txt\)"


def _write_image(path, fmt, value):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((4, 6, 3), value, np.uint8)).save(path, format=fmt)


def _captions(name):
  return [f"{name} caption {k}" for k in range(karpathy.NUM_CAPTIONS)]


def _write_split_files(folder, train, test, image_dir, fmt):
  """The four AMFMN/HVSA split files for the file names `train` and `test`, and their images in `image_dir`."""
  folder.mkdir(parents=True)
  for split, names, repeat in (("train", train, 1), ("test", test, karpathy.NUM_CAPTIONS)):
    (folder / f"{split}_caps.txt").write_text("".join(f"{c}\n" for name in names for c in _captions(name)))
    (folder / f"{split}_filename.txt").write_text("".join(f"{name}\n" * repeat for name in names))
  for value, name in enumerate(train + test):
    _write_image(folder / image_dir / name, fmt, 40 * value)
  return folder


def _write_karpathy_ucm(folder):
  """UCM-Captions as published: `dataset.json` and `imgs/`."""
  images = [{"filename": f"{i + 1}.tif", "imgid": i, "split": split, "sentences": [{"raw": c} for c in _captions(i)]}
            for i, split in enumerate(("train", "val", "test"))]
  folder.mkdir(parents=True)
  (folder / "dataset.json").write_text(json.dumps({"images": images}))
  for image in images:
    _write_image(folder / "imgs" / image["filename"], "TIFF", 10)
  return folder


def _open(name, manual_dir, data_dir, split):
  config = ml_collections.ConfigDict(dict(name=name, data_dir=str(data_dir), manual_dir=str(manual_dir)))
  source = sources.open_split(config, split)
  return [source[i] for i in range(len(source))]


def _build(name, manual_dir, data_dir):
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, try_download_gcs=False))
  return builder


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_split_files_build_each_dataset_by_its_name(tmp_path, name):
  train, test, image_dir, fmt, scenes = LAYOUTS[name]
  manual_dir = _write_split_files(tmp_path / f"{name}_precomp", train, test, image_dir, fmt)
  records = {split: _open(f"amfmn_splits/{name}", manual_dir, tmp_path / "data", split) for split in ("train", "test")}
  assert {split: [sources.as_text(r["filename"]) for r in rs] for split, rs in records.items()} == {
      "train": train, "test": test}
  every = records["train"] + records["test"]
  assert [int(r["image_id"]) for r in every] == [0, 1, 2]
  assert [sources.as_text(c) for c in every[2]["captions"]] == _captions(test[0])
  builder = tfds.builder(f"amfmn_splits/{name}", data_dir=tmp_path / "data")
  if scenes is None:
    assert "scene" not in builder.info.features and all("scene" not in r for r in every)
  else:
    classes = builder.info.features["scene"].names
    assert [int(r["scene"]) for r in every] == [karpathy.NO_SCENE if s is None else classes.index(s) for s in scenes]


def test_split_files_are_read_from_the_dataset_folder_of_amfmn_data(tmp_path):
  data = tmp_path / "AMFMN/data"
  for name in ("rsicd", "ucm"):
    train, test, _, fmt, _ = LAYOUTS[name]
    _write_split_files(data / f"{name}_precomp", train, test, "images", fmt)
  records = _open("amfmn_splits/ucm", data, tmp_path / "tfds", "train")
  assert [sources.as_text(r["filename"]) for r in records] == LAYOUTS["ucm"][0]


@pytest.mark.parametrize("name, expected", [
    ("rsicd", r"dataset_rsicd\.json \(Karpathy format\) and RSICD_images/ in manual_dir"),
    ("amfmn_splits/sydney", rf"the AMFMN/HVSA split files {SPLIT_FILE_PATTERN} and images/ or imgs/ in manual_dir or "
                            r"in its sydney_precomp/"),
], ids=["karpathy_json", "split_files"])
def test_absent_manual_dir_names_the_expected_layout_and_the_flag(tmp_path, name, expected):
  absent = tmp_path / "absent"
  with pytest.raises(FileNotFoundError, match=(
      rf"^{name}: manual_dir {re.escape(str(absent))} does not exist or is empty; expected {expected}\. Set "
      r"--config\.dataset\.manual_dir \(or manual_dir= in the config arg\) to the folder that holds them\.$")):
    _open(name, absent, tmp_path / "data", "train")


def test_unset_manual_dir_says_so(tmp_path):
  with pytest.raises(FileNotFoundError, match=(
      r"^ucm_captions: dataset\.manual_dir is not set \(and tfds' default .*downloads/manual is absent or empty\); "
      r"expected dataset\.json \(Karpathy format\) and imgs/ in manual_dir\. Set --config\.dataset\.manual_dir")):
    _open("ucm_captions", "", tmp_path / "data", "train")


def test_published_builder_on_split_files_names_its_layout_and_the_split_file_builder(tmp_path):
  train, test, _, fmt, _ = LAYOUTS["ucm"]
  manual_dir = _write_split_files(tmp_path / "ucm_precomp", train, test, "images", fmt)
  with pytest.raises(FileNotFoundError, match=(
      rf"^{re.escape(str(manual_dir / 'dataset.json'))}: not found; ucm_captions expects dataset\.json \(Karpathy "
      rf"format\) and imgs/ in manual_dir \(manual_dir {re.escape(str(manual_dir))} holds: images/, test_caps\.txt, "
      r"test_filename\.txt, train_caps\.txt, train_filename\.txt\)\. Those are AMFMN/HVSA split files: use "
      r"--config\.dataset\.name=amfmn_splits/ucm$")):
    _open("ucm_captions", manual_dir, tmp_path / "data", "train")


def test_published_builder_without_its_image_folder_names_it(tmp_path):
  manual_dir = _write_karpathy_ucm(tmp_path / "UCM_captions")
  (manual_dir / "imgs").rename(manual_dir / "pictures")
  with pytest.raises(FileNotFoundError, match=(
      rf"^{re.escape(str(manual_dir / 'imgs'))}: not found; ucm_captions expects dataset\.json \(Karpathy format\) "
      r"and imgs/ in manual_dir \(manual_dir .* holds: dataset\.json, pictures/\)\.$")):
    _build("ucm_captions", manual_dir, tmp_path / "data")


def test_split_file_builder_on_the_published_layout_names_its_layout_and_the_published_builder(tmp_path):
  manual_dir = _write_karpathy_ucm(tmp_path / "UCM_captions")
  with pytest.raises(FileNotFoundError, match=(
      rf"^{re.escape(str(manual_dir))}: missing train_caps\.txt, train_filename\.txt, test_caps\.txt, "
      rf"test_filename\.txt; amfmn_splits/ucm expects the AMFMN/HVSA split files {SPLIT_FILE_PATTERN} and images/ or "
      r"imgs/ in manual_dir or in its ucm_precomp/ \(it holds: dataset\.json, imgs/\)\. dataset\.json is the "
      r"published layout: use --config\.dataset\.name=ucm_captions$")):
    _open("amfmn_splits/ucm", manual_dir, tmp_path / "data", "train")


def test_split_file_builder_lists_what_an_unrelated_folder_holds(tmp_path):
  manual_dir = tmp_path / "downloads"
  for k in range(10):
    (manual_dir / f"part{k}").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match=(
      r"downloads: missing train_caps\.txt, .* \(it holds: part0/, part1/, part2/, part3/, part4/, part5/, part6/, "
      r"part7/, \.\.\. \(10 entries\)\)\.$")):
    _build("amfmn_splits/rsitmd", manual_dir, tmp_path / "data")


def test_missing_images_name_the_skip_config_flag_which_then_builds(tmp_path):
  train, test, _, fmt, _ = LAYOUTS["sydney"]
  manual_dir = _write_split_files(tmp_path / "sydney_precomp", train, test, "images", fmt)
  (manual_dir / "images/613.tif").unlink()
  with pytest.raises(FileNotFoundError, match=(
      rf"^amfmn_splits/sydney: 1 images named in the dataset files are missing under {re.escape(str(manual_dir))}; "
      r"first 5: \['images/613\.tif'\]\. Add them, or skip them \(counted in the dataset's metadata\) with "
      r"--config\.dataset\.name=amfmn_splits/sydney_skip_missing_images$")):
    _open("amfmn_splits/sydney", manual_dir, tmp_path / "data", "train")
  records = _open("amfmn_splits/sydney_skip_missing_images", manual_dir, tmp_path / "data", "train")
  assert [sources.as_text(r["filename"]) for r in records] == train
  builder = tfds.builder("amfmn_splits/sydney_skip_missing_images", data_dir=tmp_path / "data")
  assert builder.info.metadata["repairs"]["test"] == {"missing_image_skipped": 1}


def test_unknown_builder_config_lists_the_dataset_names(tmp_path):
  names = ", ".join(f"amfmn_splits/{c.name}" for c in amfmn_splits.AmfmnSplits.BUILDER_CONFIGS)
  with pytest.raises(ValueError, match=(
      r"^dataset\.name='amfmn_splits/ucm_captions': builder amfmn_splits has no config 'ucm_captions'; expected "
      rf"--config\.dataset\.name= one of {re.escape(names)}$")):
    _open("amfmn_splits/ucm_captions", tmp_path, tmp_path / "data", "train")
  with pytest.raises(ValueError, match=r"builder rsicd has no config 'rsicd'; expected --config\.dataset\.name= one "
                                       r"of rsicd/default, rsicd/skip_missing_images$"):
    _open("rsicd/rsicd", tmp_path, tmp_path / "data", "train")


def test_ucm_scene_of_a_split_file_name():
  assert [ucm_captions.UcmCaptions.scene_of_file(f"{n}.tif", "") for n in (1, 100, 101, 2100)] == [0, 0, 1, 20]
  for name in ("0.tif", "2101.tif", "a.tif"):
    with pytest.raises(ValueError, match=rf"^test_filename\.txt: {name}: file name '{re.escape(name)}' is not "
                                         r"<n>\.tif with n in 1\.\.2100, so its UC Merced class \(100 consecutive "
                                         r"numbers per class\) is unknown$"):
      ucm_captions.UcmCaptions.scene_of_file(name, f"test_filename.txt: {name}")
  assert rsicd.Rsicd.scene_of_file("00002.jpg", "") == karpathy.NO_SCENE
