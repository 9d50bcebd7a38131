"""Recall@K for remote-sensing text-image retrieval (docs/METHODS.md §1.7 and §5 item 11).

Both directions come from one similarity matrix ``sim`` (n_images, n_captions) and
the ground-truth (GT) image of every caption:

* i2t: image i is a hit at K if its best-ranked GT caption is in the top K.
* t2i: caption j is a hit at K if its image ``caption_image[j]`` is in the top K.

Identical caption strings get bit-identical scores, so ties are frequent and move
R@1 by tens of points. The headline rule ``ties='expected'`` is the exact
probability of a hit under uniformly random tie order (what the reference's
arbitrary argsort order gives on average); ``'optimistic'`` and ``'pessimistic'``
are the bounds where every tie goes for / against the query.
"""
from collections.abc import Mapping, Sequence

import numpy as np

TIES = ("expected", "optimistic", "pessimistic")
_CHUNK_ELEMENTS = 1 << 24  # similarity entries per chunk (64 MiB of float32).


def retrieval_metrics(
    sim,
    caption_image,
    ks: Sequence[int] = (1, 5, 10),
    ties: str = "expected",
    chunk_size: int | None = None,
    t2i_sim=None,
) -> dict[str, float]:
    """R@K (percent) in both directions, their mean ``mR`` and sum ``rsum``, and mean ranks.

    Args:
      sim: (n_images, n_captions) scores, higher is more similar.
      caption_image: (n_captions,) int, the GT image of each caption; any number
        (>= 1) of captions per image.
      ks: the K of R@K.
      ties: 'expected' (headline), 'optimistic' or 'pessimistic' (labelled bounds).
      chunk_size: image rows per chunk; default keeps a chunk near 16M entries,
        so memory beyond ``sim`` stays bounded for any matrix size.
      t2i_sim: the t2i direction's scores where they differ from ``sim``'s (a
        test-time normalisation of each direction, `evaluation.querybank`).

    Returns:
      ``{i2t_R<K>..., t2i_R<K>..., mR, rsum, i2t_meanr, t2i_meanr}`` as floats
      (``i2t_R1`` is i2t R@1: no '@', so a name is also a valid TensorBoard tag);
      mean ranks are 1-based (expected rank under the chosen tie rule).
    """
    sim, caption_image = _validate(sim, caption_image)
    ks = tuple(ks)
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    counts = dict(zip(("i2t", "t2i"), _tie_counts(sim, caption_image, chunk_size)))
    if t2i_sim is not None:
        t2i_sim, _ = _validate(t2i_sim, caption_image)
        counts["t2i"] = _tie_counts(t2i_sim, caption_image, chunk_size)[1]
    metrics = {
        f"{d}_R{k}": 100.0 * float(np.mean(_hit_probability(*counts[d], int(k), ties)))
        for d in counts
        for k in ks
    }
    recalls = list(metrics.values())
    metrics["mR"] = float(np.mean(recalls))
    metrics["rsum"] = float(np.sum(recalls))
    for d in counts:
        metrics[f"{d}_meanr"] = float(np.mean(_rank(*counts[d], ties))) + 1.0
    return metrics


def format_table(metrics: Mapping, title: str = "") -> str:
    """Markdown table in the papers' layout and notation (i2t R@1 ...), from one result dict or a dict of row name
    -> result dict."""
    named = all(isinstance(v, Mapping) for v in metrics.values())
    rows = metrics if named else {"": metrics}
    ks = [c.removeprefix("i2t_R") for c in next(iter(rows.values())) if c.startswith("i2t_R")]
    cols = [f"{d}_R{k}" for d in ("i2t", "t2i") for k in ks] + ["mR", "rsum"]
    labels = [f"{d} R@{k}" if k == ks[0] else f"R@{k}" for d in ("i2t", "t2i") for k in ks] + ["mR", "rsum"]
    lead = ["model"] if named else []
    lines = [f"**{title}**", ""] if title else []
    lines.append("| " + " | ".join(lead + labels) + " |")
    lines.append("|" + "|".join(["---"] * len(lead) + ["---:"] * len(labels)) + "|")
    for name, m in rows.items():
        lines.append("| " + " | ".join(([name] if named else []) + [f"{m[c]:.2f}" for c in cols]) + " |")
    return "\n".join(lines)


def _validate(sim, caption_image) -> tuple[np.ndarray, np.ndarray]:
    sim, caption_image = np.asarray(sim), np.asarray(caption_image)
    if sim.ndim != 2 or 0 in sim.shape:
        raise ValueError(f"sim must be a non-empty 2-D (n_images, n_captions) array, got shape {sim.shape}")
    n_images, n_captions = sim.shape
    if caption_image.shape != (n_captions,):
        raise ValueError(
            f"caption_image must have shape (n_captions,) = ({n_captions},) to match sim {sim.shape}, "
            f"got {caption_image.shape}"
        )
    if not np.issubdtype(caption_image.dtype, np.integer):
        raise TypeError(f"caption_image must hold integer image indices, got dtype {caption_image.dtype}")
    bad = np.flatnonzero((caption_image < 0) | (caption_image >= n_images))
    if bad.size:
        raise ValueError(
            f"caption_image must index images in [0, {n_images}); caption {bad[0]} points to image "
            f"{caption_image[bad[0]]} ({bad.size} out of range)"
        )
    empty = np.flatnonzero(np.bincount(caption_image, minlength=n_images) == 0)
    if empty.size:
        raise ValueError(
            f"image {empty[0]} has no caption ({empty.size} images without captions, first: "
            f"{empty[:10].tolist()}); every image needs at least one GT caption"
        )
    return sim, caption_image


def _tie_counts(sim: np.ndarray, caption_image: np.ndarray, chunk_size: int | None):
    """Per query (g, t, m): non-GT items scoring above the best GT score s*, non-GT equal to s*, GT equal to s*.

    One pass over row chunks serves both directions: i2t queries are the chunk's
    rows, and t2i counts (one GT image per caption, so m = 1) add up over rows.
    """
    n_images, n_captions = sim.shape
    rows = chunk_size or max(1, _CHUNK_ELEMENTS // n_captions)
    per_image = np.bincount(caption_image, minlength=n_images)
    offsets = np.concatenate([[0], np.cumsum(per_image)])
    by_image = np.argsort(caption_image, kind="stable")  # caption ids grouped by image
    t2i_best = sim[caption_image, np.arange(n_captions)]
    i2t = np.empty((3, n_images), np.int64)
    t2i_above = np.zeros(n_captions, np.int64)
    t2i_equal = np.zeros(n_captions, np.int64)
    for r0 in range(0, n_images, rows):
        r1 = min(r0 + rows, n_images)
        block = sim[r0:r1]
        if np.isnan(block).any():
            raise ValueError(f"sim contains NaN (within image rows {r0}..{r1 - 1})")
        # Best GT score per image: a segmented max over the GT scores, grouped by image.
        n_gt = per_image[r0:r1]
        starts = offsets[r0:r1] - offsets[r0]
        gt = block[np.repeat(np.arange(r1 - r0), n_gt), by_image[offsets[r0] : offsets[r1]]]
        best = np.maximum.reduceat(gt, starts)
        m = np.add.reduceat(gt == np.repeat(best, n_gt), starts)
        i2t[0, r0:r1] = np.count_nonzero(block > best[:, None], axis=1)
        i2t[1, r0:r1] = np.count_nonzero(block == best[:, None], axis=1) - m
        i2t[2, r0:r1] = m
        t2i_above += np.count_nonzero(block > t2i_best, axis=0)
        t2i_equal += np.count_nonzero(block == t2i_best, axis=0)
    return tuple(i2t), (t2i_above, t2i_equal - 1, np.ones(n_captions, np.int64))


def _hit_probability(g, t, m, k: int, ties: str) -> np.ndarray:
    """P(rank < k), rank = g + X with X the tied non-GT items placed before the first tied GT item.

    Under random tie order P(X >= x) = C(t, x) / C(t + m, x) = prod_{i<x} (t - i) / (t + m - i),
    taken as a product so no large binomial is formed; it is 0 when x > t (a sure hit).
    """
    if ties == "optimistic":
        return (g < k).astype(np.float64)
    if ties == "pessimistic":
        return (g + t < k).astype(np.float64)
    x = k - g  # tied non-GT items that would push the query out of the top k
    miss = np.ones(g.shape)
    for i in range(k):
        factor = np.maximum(t - i, 0) / np.maximum(t + m - i, 1)
        miss *= np.where(i < x, factor, 1.0)
    return 1.0 - miss


def _rank(g, t, m, ties: str) -> np.ndarray:
    """0-based rank of the best GT item; under random ties E[X] = t / (m + 1)."""
    if ties == "optimistic":
        return g.astype(np.float64)
    if ties == "pessimistic":
        return (g + t).astype(np.float64)
    return g + t / (m + 1)
