"""CCNet: Cross-modality Consistency Network (Sha et al., IEEE JSTARS 2025), as this project interprets it.

Only the paper's abstract is public (docs/METHODS.md Part B §2.1): a Text-image Attention-conditioned Module (TAM) that
aggregates the image regions relevant to a text, a Co-occurrent Features Module (CFM) that strengthens co-occurring
features of both modalities, and a cross-modality distinction loss (`rsalign_jax.losses.ccnet`). Everything concrete
below is OUR design (docs/METHODS.md Part B §2.2), not the paper's:

- Towers (ours; docs/METHODS.md Part B §2.2.1 suggests Swin-T/CLIP + BERT, this uses the project's HVSA-style
  towers trained from scratch): ResNet-18 layer4 features; every cell of the h x w map is a region, Linear(C, d) gives
  the N = h*w region tokens v_j, Linear(C, d) of the mean-pooled map the global v_g. Text: the uni-skip GRU of
  `skipthoughts`; its per-step states, Linear(H, d), are the word tokens w_i (each sees only the words before it),
  Linear(H, d) of the state at the last real token is the global t_g. An empty caption keeps its first position.
- TAM (ours): words attend over regions, A = softmax_j(<w_i Wq, v_j Wk> / sqrt(d_a)); relevance r_j = max over the
  caption's words of A_ij; redundancy filter: only the top_k regions by r_j are pooled (ties at the k-th value are
  all kept); v_t = sum_j softmax_j(r_j / pool_temperature) (v_j Wv); v^(T) = normalize(v_g + MLP(v_t)), MLP =
  Linear-ReLU-Linear. The MLP runs once per (image, caption) pair, so it holds plain arrays (no submodule), which
  lets the pair loop be a plain `lax.map`.
- CFM (ours): s_ij = cos(w_i, v_j); co-occurrence P_ij = softmax over all (word, region) pairs of the caption and
  image of s_ij / cooccurrence_temperature, marginals p(w_i) = sum_j P_ij, p(v_j) = sum_i P_ij. Reinforcement with
  the marginal measured against uniform: v'_j = v^_j + alpha N p(v_j) sum_i P(w_i|v_j) w^_i and
  w'_i = w^_i + alpha L p(w_i) sum_j P(v_j|w_i) v^_j (hats: unit vectors; L: the caption's real words), i.e.
  V' = V^ + alpha N P^T W^, W' = W^ + alpha L P V^. Fine-grained score S_f = mean_i max_j cos(w'_i, v'_j).
  cos(w'_i, v'_j) is computed from Gram matrices (W^ W^T, V^ V^T, P, S), never materialising the per-pair d-wide
  reinforced features: pair memory O(L N) instead of O((L + N) d), and fewer flops.
- Score (ours): S = score_lambda cos(v^(T), t_g) + (1 - score_lambda) S_f.

Because TAM and CFM make the score pairwise, `embed_images` returns the region tokens and v_g and `embed_texts` the
word tokens, their mask and t_g, each PACKED into one float32 row (the evaluator slices and concatenates embeddings
as arrays): images [v_1..v_N | v_g] of width (N + 1) d, texts [w_1..w_L | mask_1..mask_L | t_g] of width
L (d + 1) + d. `score` unpacks them and computes every pair in (image_chunk x text_chunk) blocks with nested
`lax.map`s (inputs padded with copies of their last row to whole blocks), so memory is bounded by a block.
"""
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from rsalign_jax.similarity import l2_normalize
from rsalign_jax.models import base
from rsalign_jax.models import layers
from rsalign_jax.models import resnet
from rsalign_jax.models import skipthoughts

_HIGHEST = lax.Precision.HIGHEST  # rankings must not depend on TF32


def _einsum(spec, *operands):
  return jnp.einsum(spec, *operands, precision=_HIGHEST)


def _f32(x):
  return x.astype(jnp.float32)


# ---------------------------------------------------------------- packing


def pack_images(regions: jax.Array, global_: jax.Array) -> jax.Array:
  """(B, N, d) region tokens and (B, d) global vectors -> (B, (N + 1) d) float32."""
  return jnp.concatenate([regions.reshape(regions.shape[0], -1), global_], axis=-1).astype(jnp.float32)


def unpack_images(packed: jax.Array, dim: int) -> tuple[jax.Array, jax.Array]:
  """Inverse of `pack_images` for embed_dim `dim`."""
  width = packed.shape[-1]
  if width % dim or width // dim < 2:
    raise ValueError(f"CCNet image embeddings have width {width}; expected (regions + 1) * embed_dim={dim}")
  n = width // dim - 1
  return packed[:, :n * dim].reshape(-1, n, dim), packed[:, n * dim:]


def pack_texts(words: jax.Array, mask: jax.Array, global_: jax.Array) -> jax.Array:
  """(B, L, d) word tokens, (B, L) bool mask and (B, d) global vectors -> (B, L (d + 1) + d) float32."""
  return jnp.concatenate([words.reshape(words.shape[0], -1), mask.astype(words.dtype), global_],
                         axis=-1).astype(jnp.float32)


def unpack_texts(packed: jax.Array, dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Inverse of `pack_texts` for embed_dim `dim`: words, bool mask, global."""
  width = packed.shape[-1]
  length, rest = divmod(width - dim, dim + 1)
  if rest or length < 1:
    raise ValueError(f"CCNet text embeddings have width {width}; expected max_len * (embed_dim + 1) + embed_dim "
                     f"with embed_dim={dim}")
  words = packed[:, :length * dim].reshape(-1, length, dim)
  mask = packed[:, length * dim:length * (dim + 1)] > 0.5
  return words, mask, packed[:, length * (dim + 1):]


# ---------------------------------------------------------------- pairwise scoring (pure functions)


def tam_scores(images: dict, texts: dict, mlp: Callable[[jax.Array], jax.Array], *, top_k: int,
               pool_temperature: float) -> jax.Array:
  """(n, m) cos(v^(T), t_g) of every pair of a block.

  images: keys (n, N, d_a), values (n, N, d), global (n, d); texts: queries (m, L, d_a), mask (m, L) bool,
  global (m, d), unit-normalised.
  """
  logits = _einsum("bld,and->abln", texts["queries"], images["keys"]) / math.sqrt(texts["queries"].shape[-1])
  attention = jax.nn.softmax(logits, axis=-1)
  relevance = jnp.max(jnp.where(texts["mask"][None, :, :, None], attention, -jnp.inf), axis=2)  # (n, m, N)
  # Region j is kept when fewer than top_k regions are strictly more relevant (O(N^2) compares: on XLA:CPU
  # 30x faster than lax.top_k for N = 9).
  rank = jnp.sum(relevance[..., None, :] > relevance[..., :, None], axis=-1)
  keep = rank < top_k
  weights = jax.nn.softmax(jnp.where(keep, relevance / pool_temperature, -jnp.inf), axis=-1)
  pooled = _einsum("abn,and->abd", weights, images["values"])
  visual = l2_normalize(images["global"][:, None, :] + mlp(pooled))
  return _einsum("abd,bd->ab", visual, texts["global"])


def cfm_scores(images: dict, texts: dict, *, cooccurrence_temperature: float, alpha: float,
               eps: float = 1e-12) -> jax.Array:
  """(n, m) fine-grained score S_f of every pair of a block, via Gram matrices (see the module docstring).

  images: regions (n, N, d) unit rows; texts: words (m, L, d) unit rows (zero where masked), mask (m, L) bool.
  """
  v, w, mask = images["regions"], texts["words"], texts["mask"]
  s = _einsum("bld,and->abln", w, v)  # (n, m, L, N)
  logits = jnp.where(mask[None, :, :, None], s / cooccurrence_temperature, -jnp.inf)
  p = jnp.exp(logits - jax.nn.logsumexp(logits, axis=(2, 3), keepdims=True))
  num_words = jnp.sum(mask, axis=-1).astype(s.dtype)  # (m,)
  a = alpha * num_words[None, :, None, None]  # words take alpha * L * P V^
  b = alpha * v.shape[1]  # regions take alpha * N * P^T W^
  gram_w = _einsum("bld,bkd->blk", w, w)
  gram_v = _einsum("and,amd->anm", v, v)
  gw_p = _einsum("blk,abkn->abln", gram_w, p)  # (W^ W^T P)_ij
  p_gv = _einsum("abln,anm->ablm", p, gram_v)  # (P V^ V^T)_ij
  p_st_p = _einsum("abln,abnm->ablm", p, _einsum("abkn,abkm->abnm", s, p))  # (P S^T P)_ij
  dots = s + b * gw_p + a * p_gv + a * b * p_st_p  # <w'_i, v'_j>
  p_s = p * s
  word_sq = (jnp.diagonal(gram_w, axis1=1, axis2=2)[None] + 2 * a[..., 0] * jnp.sum(p_s, axis=-1)
             + a[..., 0] ** 2 * jnp.sum(p_gv * p, axis=-1))  # (n, m, L)
  region_sq = (jnp.diagonal(gram_v, axis1=1, axis2=2)[:, None] + 2 * b * jnp.sum(p_s, axis=2)
               + b ** 2 * jnp.sum(gw_p * p, axis=2))  # (n, m, N)
  cos = dots / jnp.sqrt(jnp.maximum(word_sq[..., None] * region_sq[:, :, None, :], eps))
  best = jnp.max(cos, axis=-1)
  return jnp.sum(jnp.where(mask[None], best, 0.0), axis=-1) / num_words[None]


def pair_scores(images: dict, texts: dict, mlp: Callable[[jax.Array], jax.Array], *, top_k: int,
                pool_temperature: float, cooccurrence_temperature: float, alpha: float,
                score_lambda: float) -> jax.Array:
  """(n, m) CCNet scores S = lambda TAM + (1 - lambda) CFM of a block (inputs as in `tam_scores`/`cfm_scores`)."""
  tam = tam_scores(images, texts, mlp, top_k=top_k, pool_temperature=pool_temperature)
  cfm = cfm_scores(images, texts, cooccurrence_temperature=cooccurrence_temperature, alpha=alpha)
  return score_lambda * tam + (1 - score_lambda) * cfm


def chunked_pairwise(fn: Callable[[Any, Any], jax.Array], images, texts, image_chunk: int,
                     text_chunk: int) -> jax.Array:
  """fn(image_block, text_block) -> (ci, ct) over all (n, m) pairs, one block at a time (nested `lax.map`)."""
  n, m = len(jax.tree.leaves(images)[0]), len(jax.tree.leaves(texts)[0])
  image_rows = lambda image_block: layers.map_in_blocks(lambda text_block: fn(image_block, text_block).T, texts,
                                                        min(text_chunk, m)).T
  return layers.map_in_blocks(image_rows, images, min(image_chunk, n))


# ---------------------------------------------------------------- the model


class Model(base.RetrievalModel):
  """CCNet's towers and pairwise TAM + CFM score (all design choices ours, see the module docstring)."""
  PAIRWISE = True
  vocab_size: int
  embed_dim: int = 512
  attention_dim: int = 128
  mlp_dim: int = 512
  resnet_depth: int = 18
  resnet_width: int = 64
  word_dim: int = 620
  hidden_dim: int = 2400
  text_dropout: float = 0.25
  top_k: int = 40
  pool_temperature: float = 0.1
  cooccurrence_temperature: float = 0.1
  alpha: float = 0.5
  score_lambda: float = 0.5
  image_chunk: int = 32
  text_chunk: int = 256
  dtype: Any = jnp.float32

  def setup(self):
    d = self.embed_dim
    self.resnet = resnet.ResNet(self.resnet_depth, self.resnet_width, self.dtype)
    c = self.resnet.out_features
    self.region_fc = layers.torch_dense(d, fan_in=c, dtype=self.dtype)
    self.image_fc = layers.torch_dense(d, fan_in=c, dtype=self.dtype)
    self.skipthoughts = skipthoughts.BayesianUniSkip(self.vocab_size, self.word_dim, self.hidden_dim,
                                                     self.text_dropout, self.dtype)
    self.word_fc = layers.torch_dense(d, fan_in=self.hidden_dim, dtype=self.dtype)
    self.text_fc = layers.torch_dense(d, fan_in=self.hidden_dim, dtype=self.dtype)
    self.query = layers.torch_dense(self.attention_dim, fan_in=d, dtype=self.dtype)
    self.key = layers.torch_dense(self.attention_dim, fan_in=d, dtype=self.dtype)
    self.value = layers.torch_dense(d, fan_in=d, dtype=self.dtype)
    self.mlp_hidden_kernel = self.param("mlp_hidden_kernel", layers.torch_kernel_init, (d, self.mlp_dim))
    self.mlp_hidden_bias = self.param("mlp_hidden_bias", layers.torch_bias_init(d), (self.mlp_dim,))
    self.mlp_out_kernel = self.param("mlp_out_kernel", layers.torch_kernel_init, (self.mlp_dim, d))
    self.mlp_out_bias = self.param("mlp_out_bias", layers.torch_bias_init(self.mlp_dim), (d,))

  def embed_images(self, images: jax.Array, *, train: bool) -> jax.Array:
    """(B, H, W, 3) normalised images -> (B, (N + 1) embed_dim) packed region tokens and global vector."""
    f4 = self.resnet(images, train=train)["f4"]
    regions = self.region_fc(f4).reshape(f4.shape[0], -1, self.embed_dim)
    return pack_images(regions, self.image_fc(f4.mean(axis=(1, 2))))

  def embed_texts(self, tokens: jax.Array, lengths: jax.Array, *, train: bool) -> jax.Array:
    """(B, T) 0-padded token ids, (B,) lengths -> (B, T (embed_dim + 1) + embed_dim) packed words, mask, global."""
    states = self.skipthoughts(tokens, lengths, train=train, all_states=True)  # (B, T, H)
    count = jnp.maximum(lengths, 1)
    last = jnp.take_along_axis(states, (count - 1)[:, None, None], axis=1)[:, 0]
    mask = jnp.arange(tokens.shape[1])[None, :] < count[:, None]
    return pack_texts(self.word_fc(states), mask, self.text_fc(last))

  def _mlp(self, x):
    h = nn.relu(jnp.dot(x, self.mlp_hidden_kernel, precision=_HIGHEST) + self.mlp_hidden_bias)
    return jnp.dot(h, self.mlp_out_kernel, precision=_HIGHEST) + self.mlp_out_bias

  def score(self, image_embedding: jax.Array, text_embedding: jax.Array) -> jax.Array:
    """(n, m) CCNet scores of packed embeddings, computed in (image_chunk x text_chunk) blocks."""
    regions, image_global = unpack_images(image_embedding, self.embed_dim)
    words, mask, text_global = unpack_texts(text_embedding, self.embed_dim)
    images = {"keys": _f32(self.key(regions)), "values": _f32(self.value(regions)), "global": image_global,
              "regions": l2_normalize(regions)}
    texts = {"queries": _f32(self.query(words)), "mask": mask, "global": l2_normalize(text_global),
             "words": l2_normalize(words) * mask[..., None]}
    fn = functools.partial(pair_scores, mlp=self._mlp, top_k=self.top_k,
                           pool_temperature=self.pool_temperature,
                           cooccurrence_temperature=self.cooccurrence_temperature, alpha=self.alpha,
                           score_lambda=self.score_lambda)
    return chunked_pairwise(fn, images, texts, self.image_chunk, self.text_chunk)

  def __call__(self, images: jax.Array, tokens: jax.Array, lengths: jax.Array, *,
               train: bool) -> dict[str, jax.Array]:
    """The (B, B) score matrix of the batch and the global embeddings v_g, t_g (for the class term)."""
    image_embedding = self.embed_images(images, train=train)
    text_embedding = self.embed_texts(tokens, lengths, train=train)
    return dict(scores=self.score(image_embedding, text_embedding),
                image_embedding=unpack_images(image_embedding, self.embed_dim)[1],
                text_embedding=unpack_texts(text_embedding, self.embed_dim)[2])

