"""`rsalign_jax.load`: a runlocal HVSA workdir copied alone (its config naming a dataset that does not exist) embeds,
scores and searches exactly as `--mode=search` does on the original, on 8 virtual CPU devices."""
import json
import shutil

import numpy as np
import PIL.Image
import pytest

import rsalign_jax
from rsalign_jax.modes import export, search
from rsalign_jax.modes import trained as trained_lib

QUERIES = ["many planes are parked near a runway", "a river runs through the green forest"]


@pytest.fixture(scope="module")
def original(hvsa_run, tmp_path_factory):
  """(search results on the session's runlocal workdir, the test split's image files and captions, a copy of the
  workdir whose config names a dataset that does not exist, (an export, search results over it))."""
  config, workdir, _ = hvsa_run
  data = trained_lib.load(config, str(workdir)).setup.split(config.dataset.test_split)
  files = tmp_path_factory.mktemp("gallery_files")
  paths = []
  for position, filename in enumerate(data.index.filenames):
    paths.append(files / filename)
    paths[-1].write_bytes(data.inputs[position]["image"])
  text_results = search.run(config, str(workdir), queries=QUERIES, k=5)
  image_results = search.run(config, str(workdir), image_paths=[str(p) for p in paths[:2]], k=5)
  exported = tmp_path_factory.mktemp("export")
  export.export(config, str(workdir), output_dir=str(exported))
  export_results = search.run(config, str(workdir), queries=QUERIES, k=5, gallery_dir=str(exported))
  copy = tmp_path_factory.mktemp("copied") / "workdir"
  shutil.copytree(workdir, copy)
  saved = json.loads((copy / "config.json").read_text())
  saved["dataset"].update(name="no_such_dataset", data_dir=str(files / "no_such_dir"), manual_dir="")
  (copy / "config.json").write_text(json.dumps(saved))
  return text_results, image_results, paths, list(data.index.captions), copy, (exported, export_results)


def test_a_copied_workdir_searches_images_as_the_search_mode_did(original):
  text_results, _, paths, _, copy, _ = original
  model = rsalign_jax.load(copy)
  assert model.checkpoint == "best val (step 4)"
  found = model.search(QUERIES, model.image_gallery(paths), k=5)
  for expected, matches in zip(text_results, found):
    assert [m.row for m in matches] == [r["row"] for r in expected["results"]]
    assert [m.score for m in matches] == [r["score"] for r in expected["results"]]
    assert [m.item for m in matches] == [str(paths[r["row"]]) for r in expected["results"]]


def test_a_copied_workdir_searches_captions_as_the_search_mode_did(original):
  _, image_results, paths, captions, copy, _ = original
  model = rsalign_jax.load(copy)
  found = model.search(paths[:2], model.text_gallery(captions), k=5)
  for expected, matches in zip(image_results, found):
    assert [m.row for m in matches] == [r["row"] for r in expected["results"]]
    assert [m.score for m in matches] == [r["score"] for r in expected["results"]]
    assert [m.item for m in matches] == [r["caption"] for r in expected["results"]]


def test_an_export_gallery_ranks_as_the_search_mode_over_it(original):
  _, _, _, _, copy, (exported, export_results) = original
  model = rsalign_jax.load(copy)
  found = model.search(QUERIES, model.export_gallery(exported), k=5)
  for expected, matches in zip(export_results, found):
    assert [(m.row, m.score, m.item) for m in matches] == [(r["row"], r["score"], r["filename"])
                                                           for r in expected["results"]]
  with pytest.raises(ValueError, match="kind='captions': expected one of"):
    model.export_gallery(exported, kind="captions")


def test_scores_are_the_search_scores_and_arrays_embed_as_their_files(original):
  text_results, _, paths, _, copy, _ = original
  model = rsalign_jax.load(copy)
  images = model.encode_images(paths)
  arrays = np.stack([np.asarray(PIL.Image.open(path).convert("RGB")) for path in paths])
  np.testing.assert_array_equal(model.encode_images(arrays), images)
  scores = model.score(images, model.encode_texts(QUERIES))
  assert scores.shape == (len(paths), len(QUERIES))
  for column, expected in enumerate(text_results):
    top = [r["row"] for r in expected["results"]]
    np.testing.assert_allclose(scores[top, column], [r["score"] for r in expected["results"]], rtol=1e-6)
    assert np.argmax(scores[:, column]) == top[0]


def test_api_input_mistakes_are_clear(original):
  _, _, paths, captions, copy, _ = original
  model = rsalign_jax.load(copy)
  with pytest.raises(ValueError, match=r"expected \(H, W, 3\) uint8 RGB"):
    model.encode_images(np.zeros((8, 8), np.float32))
  with pytest.raises(FileNotFoundError, match="no such file"):
    model.encode_images([str(paths[0]) + ".absent"])
  with pytest.raises(ValueError, match="texts: expected a str or a non-empty list of str"):
    model.encode_texts([])
  with pytest.raises(TypeError, match="expected a Gallery from image_gallery"):
    model.search(QUERIES, captions)
