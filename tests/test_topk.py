"""Exact chunked, sharded top-k (`evaluation.topk`) against a numpy stable sort, on 8 virtual devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsalign_jax.serving import hash_index
from rsalign_jax.evaluation import topk
from rsalign_jax.modes import search


def reference(scores, k):
  """Best first, ties by lower index: a stable sort of the negated scores."""
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("chunk_rows,group,query_block", [(16, 4, 8), (40, 8, 16), (1024, 32, 64)])
def test_matches_a_stable_sort_with_many_ties(chunk_rows, group, query_block):
  assert jax.device_count() == 8
  rng = np.random.default_rng(0)
  queries = rng.integers(-2, 3, size=(37, 3)).astype(np.float32)  # few distinct scores: ties everywhere
  gallery = rng.integers(-2, 3, size=(1001, 3)).astype(np.float32)  # not a multiple of any chunk
  scores, indices = topk.exact_topk(queries, gallery, 9, chunk_rows=chunk_rows, group=group,
                                    query_block=query_block)
  want_scores, want_indices = reference(queries @ gallery.T, 9)
  np.testing.assert_array_equal(indices, want_indices)
  np.testing.assert_array_equal(scores, want_scores)
  assert indices.dtype == np.int64 and scores.dtype == np.float32


def test_k_beyond_the_rows_of_a_device_and_beyond_the_gallery():
  rng = np.random.default_rng(1)
  queries, gallery = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(30, 4)).astype(np.float32)
  _, indices = topk.exact_topk(queries, gallery, 12, chunk_rows=2, group=2)  # 2 rows per device, k = 12
  np.testing.assert_array_equal(indices, reference(queries @ gallery.T, 12)[1])
  _, indices = topk.exact_topk(queries, gallery, 100)
  np.testing.assert_array_equal(indices, reference(queries @ gallery.T, 30)[1])


def test_block_topk_two_stage_equals_lax_top_k():
  rng = np.random.default_rng(2)
  scores = jnp.asarray(rng.integers(0, 6, size=(7, 256)).astype(np.float32))
  for k in (1, 5, 8):
    values, indices = topk.block_topk(scores, k, group=32)
    want_values, want_indices = jax.lax.top_k(scores, k)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(values, want_values)


def test_memmapped_pytree_gallery_with_a_parameterised_score(tmp_path):
  rng = np.random.default_rng(3)
  queries = {"a": rng.normal(size=(6, 3)).astype(np.float32), "b": rng.normal(size=(6, 2)).astype(np.float32)}
  gallery = {"a": rng.normal(size=(50, 3)).astype(np.float32), "b": rng.normal(size=(50, 2)).astype(np.float32)}
  np.save(tmp_path / "a.npy", gallery["a"])
  np.save(tmp_path / "b.npy", gallery["b"])
  mapped = {key: np.load(tmp_path / f"{key}.npy", mmap_mode="r") for key in gallery}
  weights = {"a": np.float32(2.0), "b": np.float32(-1.0)}
  scores, indices = topk.exact_topk(queries, mapped, 4, score_fn=weighted_score, variables=weights, chunk_rows=8,
                                    group=4)
  want = 2.0 * queries["a"] @ gallery["a"].T - queries["b"] @ gallery["b"].T
  want_scores, want_indices = reference(want, 4)
  np.testing.assert_array_equal(indices, want_indices)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-6)


def weighted_score(variables, queries, gallery):
  return (variables["a"] * topk.dot_scores(None, queries["a"], gallery["a"])
          + variables["b"] * topk.dot_scores(None, queries["b"], gallery["b"]))


def test_hamming_search_equals_the_hash_index_reference():
  rng = np.random.default_rng(4)
  query_codes, gallery_codes = rng.normal(size=(9, 40)), rng.normal(size=(300, 40))  # 40 bits: two words
  distances, indices = search.hamming_topk(query_codes, hash_index.pack_codes(gallery_codes), 7)
  want_indices, want_distances = hash_index.hamming_top_k(hash_index.pack_codes(query_codes),
                                                          hash_index.pack_codes(gallery_codes), 7)
  np.testing.assert_array_equal(indices, want_indices)
  np.testing.assert_array_equal(distances, want_distances)
  brute = ((query_codes[:, None, :] >= 0) != (gallery_codes[None, :, :] >= 0)).sum(-1)
  np.testing.assert_array_equal(distances, np.take_along_axis(brute, indices, axis=1))


def test_bad_arguments_are_clear_errors():
  with pytest.raises(ValueError, match="k=0: expected a positive integer"):
    topk.exact_topk(np.ones((2, 3), np.float32), np.ones((4, 3), np.float32), 0)
  with pytest.raises(ValueError, match="gallery: expected arrays with one common, non-zero leading"):
    topk.exact_topk(np.ones((2, 3), np.float32), {"a": np.ones((4, 3)), "b": np.ones((5, 3))}, 1)
