"""`--mode=zeroshot`: scene classification from class names and prompt templates (RemoteCLIP's protocol).

Each class name fills every template ("a satellite photo of {}."); the text tower embeds the prompts and every image
of a split is assigned the classes its embedding scores best against them, with the model's own `score`. Several
templates are ensembled as CLIP does for models that score by cosine (`SCORE = 'cosine'`): per class the mean of
the L2-normalised prompt embeddings, renormalised; for other models (a learned or pairwise `score`) the mean of the
scores over templates. Accuracy is measured against the dataset's `scene` labels (a tfds ClassLabel, whose names
are the default class names, underscores read as spaces); images without a label (-1) are left out.

Works for any model whose text tower embeds free text (not e.g. CCLS2T with `spacetime`): a trained workdir's
checkpoint or, with checkpoint='init', the untrained model as `config.init` initialises it, i.e. an imported
checkpoint as it is (e.g. configs/clip_finetune.py's RemoteCLIP or GeoRSCLIP file) or the random-init baseline.
"""
import os

import jax
import numpy as np
import tensorflow_datasets as tfds

from rsalign_jax import experiment
from rsalign_jax import input_spec
from rsalign_jax.data import sources
from rsalign_jax.data import tokenizers
from rsalign_jax.modes import evaluate as evaluate_lib
from rsalign_jax.modes import trained as trained_lib
from rsalign_jax.serving import embedding

DEFAULT_TEMPLATES = ("a satellite photo of {}.", "an aerial photo of {}.", "satellite imagery of {}.",
                     "an aerial view of {}.", "a remote sensing image of {}.")
INIT = "init"
TOP_K = 5
SCORE_BLOCK = 1024  # image rows scored at once


def zeroshot(config, workdir, *, checkpoint="", split="", templates_file="", classnames_file=""):
  """Classifies every image of `split` (default: the test split); prints and writes the accuracies.

  Writes WORKDIR/zeroshot_<split>.json and .md. Returns the result dict.
  """
  split = split or config.dataset.test_split
  names = scene_classes(config.dataset, split)
  classnames = (read_lines(classnames_file, "--zeroshot_classnames") if classnames_file else
                [name.replace("_", " ") for name in names])
  if len(classnames) != len(names):
    raise ValueError(f"--zeroshot_classnames={classnames_file}: {len(classnames)} names; expected one per line for "
                     f"each of the {len(names)} scene classes of {config.dataset.name}, in order: {', '.join(names)}")
  templates = read_templates(templates_file) if templates_file else list(DEFAULT_TEMPLATES)
  loaded = load(config, workdir, checkpoint)
  setup = loaded.setup
  with jax.set_mesh(setup.mesh):
    texts = embed_prompts(setup, loaded.variables, classnames, templates)
    data = setup.split(split)
    labels = np.asarray([int(data.source[i]["scene"]) for i in range(data.index.num_images)])
    labelled = labels >= 0
    if not labelled.any():
      raise ValueError(f"--mode=zeroshot: no image of {config.dataset.name} {split} has a scene label")
    images = embedding.embed_all(setup, loaded.variables, "images", embedding.image_batches(setup, data))
    scores = class_scores(setup, loaded.variables, images, texts, len(templates))
  unknown = unknown_classnames(setup, classnames)
  result = {"split": split, "dataset": config.dataset.name, "model": config.model_name,
            "checkpoint": loaded.checkpoint, "step": loaded.step, "images": int(labelled.sum()),
            "unlabelled_images": int((~labelled).sum()), "classnames": classnames, "templates": templates,
            "ensemble": "mean of unit text embeddings" if setup.model.SCORE == "cosine" else "mean of scores",
            **accuracies(scores[labelled], labels[labelled], classnames), "unknown_classnames": unknown,
            "config": config.to_dict()}
  result["table"] = format_table(result)
  evaluate_lib.write_report(workdir, f"zeroshot_{split}", result, result["table"])
  return result


def scene_classes(dataset_config, split):
  """The names of the dataset's scene classes (its `scene` ClassLabel); a dataset without them is an error."""
  sources.open_split(dataset_config, split)  # registers the builder and builds the dataset if needed
  builder = tfds.builder(dataset_config.name, data_dir=dataset_config.get("data_dir") or sources.default_data_dir(),
                         file_format="array_record")
  feature = builder.info.features["scene"] if "scene" in builder.info.features else None
  if not isinstance(feature, tfds.features.ClassLabel):
    raise ValueError(f"--mode=zeroshot: dataset {dataset_config.name!r} has no 'scene' class labels to classify "
                     "(Sydney-Captions and user data carry none); use a dataset with scene classes, e.g. "
                     "synthetic_rs, rsicd, rsitmd or ucm_captions")
  return list(feature.names)


def read_lines(path, flag):
  """The non-blank lines of a text file, stripped."""
  try:
    with open(path) as f:
      lines = [line.strip() for line in f if line.strip()]
  except FileNotFoundError:
    raise FileNotFoundError(f"{flag}={path}: no such file") from None
  if not lines:
    raise ValueError(f"{flag}={path}: the file is empty; expected one entry per line")
  return lines


def read_templates(path):
  """Prompt templates, one per line, each with one '{}' where the class name goes."""
  return check_templates(read_lines(path, "--zeroshot_templates"), f"--zeroshot_templates={path}")


def check_templates(templates, where):
  """`templates`, each checked to hold one '{}' where the class name goes."""
  for template in templates:
    if template.count("{}") != 1:
      raise ValueError(f"{where}: {template!r} has {template.count('{}')} '{{}}' placeholders; expected one, where "
                       "the class name goes, e.g. 'a satellite photo of {}.'")
  return templates


def load(config, workdir, checkpoint=""):
  """`trained_lib.load`, or with checkpoint='init' the untrained model as `config.init` initialises it (from
  config.seed, as the trainer starts), with the tokenizer the workdir keeps or one it builds and keeps there."""
  if checkpoint != INIT:
    return trained_lib.load(config, workdir, checkpoint)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  trained = os.path.exists(os.path.join(workdir, input_spec.FILENAME))
  setup = experiment.build_setup(config, workdir, trained_lib.make_mesh(config), training=not trained)
  with jax.set_mesh(setup.mesh):
    state = setup.initial_state(jax.random.key(config.seed))
  return trained_lib.Trained(setup, state, "init", int(state.step))


def prompts(classnames, templates):
  """Every template filled with every class name, class by class."""
  return [template.replace("{}", name) for name in classnames for template in templates]


def embed_prompts(setup, variables, classnames, templates):
  """The text embeddings of `prompts(classnames, templates)`."""
  if setup.model.TEXT_FIELDS:
    raise ValueError(f"--mode=zeroshot: model {setup.config.model_name!r} has a text tower that needs the "
                     f"per-image fields {setup.model.TEXT_FIELDS}, which class prompts do not have")
  # Not `encode_queries`: a class name the vocabulary does not know is a result to report, not an error.
  tokens, lengths, _ = setup.text_encoder(None, None).encode_batch(prompts(classnames, templates),
                                                                   setup.config.text.max_len)
  return embedding.embed_all(setup, variables, "texts", embedding.text_batches(setup, tokens, lengths, {}, "prompts"))


def class_scores(setup, variables, images, texts, num_templates):
  """(images, classes) scores of image embeddings against `embed_prompts`' embeddings, templates ensembled (see
  the module docstring)."""
  if setup.model.SCORE == "cosine":
    classes = _unit(_unit(texts).reshape(-1, num_templates, texts.shape[-1]).mean(1))
    return score_images(setup, variables, images, classes)
  scores = score_images(setup, variables, images, texts)
  return scores.reshape(len(scores), -1, num_templates).mean(-1)


def score_images(setup, variables, images, texts):
  """The model's (images, texts) scores, `SCORE_BLOCK` images at a time (the last block padded: one compile)."""
  rows = len(jax.tree.leaves(images)[0])
  block = min(SCORE_BLOCK, rows)
  padded = jax.tree.map(lambda a: np.concatenate([a, np.zeros((-rows % block,) + a.shape[1:], a.dtype)]), images)
  scores = [np.asarray(setup.retrieval.score(variables, jax.tree.map(lambda a: a[start:start + block], padded), texts))
            for start in range(0, rows, block)]
  return np.concatenate(scores)[:rows]


def accuracies(scores, labels, classnames):
  """Top-1 and top-k (k = 5, or the number of classes when fewer) accuracies in %, the mean of the classes' top-1,
  per-class top-1 and chance levels. Ties rank the lower class first."""
  num_classes = len(classnames)
  k = min(TOP_K, num_classes)
  ranked = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  top1 = ranked[:, 0] == labels
  topk = (ranked == labels[:, None]).any(1)
  counts = np.bincount(labels, minlength=num_classes)
  correct = np.bincount(labels, weights=top1, minlength=num_classes)
  present = counts > 0
  return {"metrics": {"top1": 100.0 * float(top1.mean()), "top5": 100.0 * float(topk.mean()),
                      "mean_per_class_top1": 100.0 * float((correct[present] / counts[present]).mean())},
          "top5_k": k, "chance": {"top1": 100.0 / num_classes, "top5": 100.0 * k / num_classes},
          "per_class": [{"class": name, "images": int(n), "top1": 100.0 * float(c / n) if n else None}
                        for name, n, c in zip(classnames, counts, correct)]}


def unknown_classnames(setup, classnames):
  """The class names none of whose words a word vocabulary knows (empty for subword tokenizers)."""
  vocab = setup.vocab
  if not isinstance(vocab, tokenizers.WordVocab):
    return []
  tokens, lengths, _ = vocab.encode_batch(classnames, setup.config.text.max_len)
  return [name for name, row, length in zip(classnames, tokens, lengths)
          if set(row[:length].tolist()) <= {vocab.unk_id}]


def format_table(result):
  """Markdown: the accuracies, then top-1 per class."""
  metrics, k = result["metrics"], result["top5_k"]
  top_k = "top-5" if k == TOP_K else f"top-{k} (only {k} classes)"
  lines = [f"Zero-shot scene classification: {result['dataset']} {result['split']}, {result['images']} images, "
           f"{len(result['classnames'])} classes, {len(result['templates'])} templates", "",
           f"| model | top-1 | {top_k} | mean per-class top-1 |", "|---|---:|---:|---:|",
           f"| {result['model']} ({result['checkpoint']}) | {metrics['top1']:.2f} | {metrics['top5']:.2f} | "
           f"{metrics['mean_per_class_top1']:.2f} |",
           f"| chance | {result['chance']['top1']:.2f} | {result['chance']['top5']:.2f} | "
           f"{result['chance']['top1']:.2f} |", "", "| class | images | top-1 |", "|---|---:|---:|"]
  lines += [f"| {entry['class']} | {entry['images']} | "
            f"{'-' if entry['top1'] is None else format(entry['top1'], '.2f')} |" for entry in result["per_class"]]
  if result["unknown_classnames"]:
    lines += ["", f"Class names with no word in the model's vocabulary (their prompts are alike): "
              f"{', '.join(result['unknown_classnames'])}"]
  return "\n".join(lines)


def _unit(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
