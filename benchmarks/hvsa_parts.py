"""Where a paper-size HVSA training step spends its time: the project (JAX) vs PyTorch, part by part, on this CPU.

  python benchmarks/hvsa_parts.py [--batches=32,64] [--reps=5] [--vocab=300] [--channels_last] [--write_data]
                                  [--image_size=0] [--cache_dir=/tmp/hvsa_speed]

The model, objective and optimizer are `configs/hvsa.py:rsitmd`'s (ResNet-18 width 64 + KEA + mean pool + Linear
image tower at 256 px; uni-skip GRU 620 -> 2400 + ReLU(Linear) text tower; HVSA's difficulty-weighted triplet +
image uniformity mixed by the learned weighting MLP; AdamW), built by `experiment.build_model` /
`experiment.build_objective` / `optimizers.make_optimizer`; the PyTorch side is this file's mirror of the same modules, loss and AdamW, run with
2 threads. Inputs are random images and tokens, with caption lengths drawn from RSITMD's word-count histogram
(`hvsa_speed.CAPTION_WORD_COUNTS`). Each part is timed alone, in ms per step, as the median of `--reps` calls after
2 warm-up calls (the first one compiles); the project's and PyTorch's calls of a part alternate, so that both see
the same load of a shared machine:
  1. image tower: gradient w.r.t. its parameters of sum(embedding^2), train mode (BatchNorm batch statistics);
  2. text tower: the same on the text embedding, train mode (variational dropout); both GRUs run to the batch's
     longest caption, as the official code does;
  3. loss: HVSA's objective on random (B, 512) embeddings, gradient w.r.t. the embeddings and the weighting MLP;
  4. optimizer: AdamW's update applied to the full parameter tree, on random gradients;
  5. the whole train step (`train.train_step` jitted as benchmarks/timing.py does, one device; PyTorch: zero_grad,
     forward, loss, backward, AdamW step); "other" is 5 - (1 + 2 + 3 + 4);
  6. host/input: one batch of the project's training loader (`pipeline.make_train_loader` with the config's
     augmentation and grain workers) over the synthetic RSITMD-layout dataset of benchmarks/hvsa_speed.py (written
     and built on first use; with --nowrite_data and no dataset, n/a). PyTorch: n/a (its DataLoader is timed by an
     external harness).
Importing hvsa_speed defines its flags, which this script shares: --batches, --image_size (0: the config's 256),
--cache_dir, --data_dir, --train_images, --test_images, --worker_count, --paper_size; --reps is redefined here.
"""
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
from absl import app
from absl import flags
from torch import nn

from rsalign_jax import optimizers
from rsalign_jax import experiment, train
from rsalign_jax.data import pipeline
from rsalign_jax.data import rsitmd
from rsalign_jax.data import sources

import hvsa_speed

_REPS = flags.DEFINE_integer("reps", 5, "Timed calls per part (the median is reported), after 2 warm-up calls.",
                             allow_override=True)
_VOCAB = flags.DEFINE_integer("vocab", 300, "Vocabulary size (the model's vocab_size; token ids 1..vocab-1).")
_CHANNELS_LAST = flags.DEFINE_bool("channels_last", True, "PyTorch's image tower in channels_last memory format.")
_WRITE_DATA = flags.DEFINE_bool("write_data", True, "Write and build hvsa_speed.py's synthetic dataset when absent "
                                "(false: part 6 is n/a without it).")

WARMUP_CALLS = 2
TORCH_THREADS = 2
PARTS = ("image", "text", "loss", "optimizer", "step")


def median_ms(calls, reps):
  """{name: median wall ms of calls[name]()} over `reps` rounds after WARMUP_CALLS untimed ones; a round makes each
  call in turn, so that all of them see the same load of a shared machine."""
  for _ in range(WARMUP_CALLS):
    for call in calls.values():
      call()
  seconds = {name: [] for name in calls}
  for _ in range(reps):
    for name, call in calls.items():
      start = time.perf_counter()
      call()
      seconds[name].append(time.perf_counter() - start)
  return {name: 1e3 * statistics.median(values) for name, values in seconds.items()}


def random_batch(config, batch_size, vocab_size, rng):
  """Random normalised images and 0-padded tokens whose lengths follow RSITMD's caption word counts."""
  size = config.dataset.image_size
  tokens, lengths = hvsa_speed.random_captions(rng, batch_size, vocab_size, config.text.max_len)
  return {"image": rng.normal(size=(batch_size, size, size, 3)).astype(np.float32), "tokens": tokens,
          "lengths": lengths, "image_id": np.arange(batch_size, dtype=np.int32)}


# --- The project (JAX) ----------------------------------------------------------------------------------------------

def project_calls(config, batch):
  """{part: a blocking call of the project's jitted part}, and the project's parameter count."""
  model, objective = experiment.build_model(config, _VOCAB.value), experiment.build_objective(config)
  schedule = optimizers.make_schedule(config, steps_per_epoch=100)
  tx = optimizers.make_optimizer(config, schedule)
  batch = jax.device_put(batch)
  state = jax.jit(functools.partial(experiment.create_train_state, model=model, objective=objective, tx=tx,
                                    example=jax.tree.map(lambda x: x[:16], batch)))(jax.random.key(0))
  params = state.params["model"]
  dropout_key = jax.random.key(1)

  def tower_loss(tower_params, other_params, batch_stats, inputs, rng, method):
    embedding, _ = model.apply({"params": {**other_params, **tower_params}, "batch_stats": batch_stats}, *inputs,
                               train=True, rngs={"dropout": rng}, mutable=["batch_stats"], method=method)
    return jnp.sum(jnp.square(embedding))

  tower_grad = jax.jit(jax.grad(tower_loss), static_argnames="method")

  def tower_call(method, inputs):
    """The tower's gradient w.r.t. only its own parameters (those `method` creates at init)."""
    shapes = jax.eval_shape(functools.partial(model.init, train=False, method=method), jax.random.key(0), *inputs)
    own = {k: v for k, v in params.items() if k in shapes["params"]}
    other = {k: v for k, v in params.items() if k not in own}
    return lambda: jax.block_until_ready(tower_grad(own, other, state.batch_stats, inputs, dropout_key, method))

  def objective_loss(objective_params, images, texts, batch):
    outputs = {"image_embedding": images, "text_embedding": texts}
    return objective.apply({"params": objective_params}, outputs, batch)[0]

  objective_grad = jax.jit(jax.grad(objective_loss, argnums=(0, 1, 2)))
  rng = np.random.default_rng(1)
  embed_dim = config.model.embed_dim
  images, texts = (rng.normal(size=(len(batch["image_id"]), embed_dim)).astype(np.float32) for _ in range(2))
  loss_inputs = (state.params["objective"], *jax.device_put((images, texts)), {"image_id": batch["image_id"]})

  @jax.jit
  def update(grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  grads = jax.device_put(jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), state.params))
  step = jax.jit(functools.partial(train.train_step, model=model, objective=objective, tx=tx, schedule=schedule,
                                   dropout_key=dropout_key, grad_cache_chunk=config.get("grad_cache_chunk", 0),
                                   frozen=optimizers.frozen_patterns(config)))
  calls = {"image": tower_call("embed_images", (batch["image"],)),
           "text": tower_call("embed_texts", (batch["tokens"], batch["lengths"])),
           "loss": lambda: jax.block_until_ready(objective_grad(*loss_inputs)),
           "optimizer": lambda: jax.block_until_ready(update(grads, state.opt_state, state.params)),
           "step": lambda: jax.block_until_ready(step(state, batch))}
  return calls, optax.tree.size(state.params)


def loader_ms(config, source, reps):
  """ms per batch of the project's training loader over `source` (tokens are zeros: the trainer tokenises once,
  before the loader)."""
  index = sources.CaptionIndex.read(source)
  tokens = np.zeros((len(index.captions), config.text.max_len), np.int32)
  lengths = np.ones((len(index.captions),), np.int32)
  items = pipeline.TrainItems(source, index, tokens, lengths, sampling=config.input.sampling,
                              global_batch_size=config.input.batch_size, process_index=0, process_count=1, seed=0,
                              name="hvsa_parts")
  batches = iter(pipeline.make_train_loader(items, pp_spec=config.input.pp_train, seed=0,
                                            worker_count=config.input.worker_count))
  return median_ms({"input": lambda: next(batches)}, reps)["input"]


# --- PyTorch ----------------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
  """torchvision's ResNet BasicBlock."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
    self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
    self.downsample = nn.Identity()
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)), inplace=True)))
    out += self.downsample(x)
    return F.relu(out, inplace=True)


class KeyEntityAttention(nn.Module):
  """HVSA's KEA (layers.KeyEntityAttention): X = conv1x1(x0), A = softmax_N(M_k X), A /= sum_S A,
  Y = BN(conv1x1(M_v A)), ReLU(Y + x0); M_v starts as M_k^T."""

  def __init__(self, channels, slots):
    super().__init__()
    self.conv1 = nn.Conv2d(channels, channels, 1)
    self.key_memory = nn.Conv1d(channels, slots, 1, bias=False)
    self.value_memory = nn.Conv1d(slots, channels, 1, bias=False)
    self.value_memory.weight.data = self.key_memory.weight.data.permute(1, 0, 2).clone()
    self.conv2, self.bn = nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels)

  def forward(self, x0):
    b, c, h, w = x0.shape
    attention = F.softmax(self.key_memory(self.conv1(x0).reshape(b, c, h * w)), dim=-1)
    attention = attention / (1e-9 + attention.sum(dim=1, keepdim=True))
    y = self.bn(self.conv2(self.value_memory(attention).reshape(b, c, h, w)))
    return F.relu(y + x0)


class ImageTower(nn.Module):
  """ResNet-18 (torchvision's, without fc) -> KEA -> mean over positions -> Linear."""

  def __init__(self, width, slots, embed_dim):
    super().__init__()
    self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                              nn.MaxPool2d(3, 2, 1))
    blocks, cin = [], width
    for stage in range(4):
      for block in range(2):
        blocks.append(BasicBlock(cin, width * 2**stage, 2 if stage and not block else 1))
        cin = width * 2**stage
    self.layers = nn.Sequential(*blocks)
    self.kea = KeyEntityAttention(cin, slots)
    self.fc = nn.Linear(cin, embed_dim)

  def forward(self, images):
    return self.fc(self.kea(self.layers(self.stem(images))).mean(dim=(2, 3)))


class TextTower(nn.Module):
  """skipthoughts.BayesianUniSkip -> ReLU(Linear). Its fused reset|update matrices are split per gate here, as the
  official code's per-gate Linear layers are (slicing a fused matrix costs a full-size gradient per slice and step)."""

  def __init__(self, vocab_size, word_dim, hidden_dim, dropout, embed_dim):
    super().__init__()
    e, h = word_dim, hidden_dim

    def gru_param(*shape):
      return nn.Parameter(torch.empty(shape).uniform_(-h**-0.5, h**-0.5))

    self.embedding = nn.Embedding(vocab_size + 1, e, padding_idx=0)
    self.w_r, self.w_z, self.wx = (gru_param(e, h) for _ in range(3))
    self.b_r, self.b_z, self.bx = (gru_param(h) for _ in range(3))
    self.u_r, self.u_z, self.ux = (gru_param(h, h) for _ in range(3))
    self.dropout, self.hidden_dim = dropout, h
    self.fc = nn.Linear(h, embed_dim)

  def forward(self, tokens, lengths, steps):
    """The embedding of 0-padded `tokens` after `steps` GRU steps (the official code: the longest caption's)."""
    h, batch = self.hidden_dim, tokens.shape[0]
    words = self.embedding(tokens[:, :steps].T)  # time-major (steps, B, word_dim)
    masks = [1.0] * 6
    if self.training and self.dropout > 0:
      keep = 1 - self.dropout
      masks = [torch.bernoulli(torch.full((batch, d), keep)) / keep for d in [words.shape[-1]] * 3 + [h] * 3]
    x_mask_r, x_mask_z, x_mask_n, h_mask_r, h_mask_z, h_mask_n = masks
    x_r = (words * x_mask_r) @ self.w_r + self.b_r  # input projections of all steps at once
    x_z = (words * x_mask_z) @ self.w_z + self.b_z
    x_n = (words * x_mask_n) @ self.wx + self.bx
    state, states = words.new_zeros(batch, h), []
    for t in range(steps):
      r = torch.sigmoid(x_r[t] + (state * h_mask_r) @ self.u_r)
      z = torch.sigmoid(x_z[t] + (state * h_mask_z) @ self.u_z)
      n = torch.tanh(x_n[t] + r * ((state * h_mask_n) @ self.ux))
      state = (1 - z) * n + z * state
      states.append(state)
    last = torch.stack(states)[lengths.clamp(min=1) - 1, torch.arange(batch)]
    return F.relu(self.fc(last))


def auto_weighting():
  """HVSA's AutoWeightedModule: softmax(W3 PReLU(W2 PReLU(W1 l)))."""
  return nn.Sequential(nn.Linear(2, 64, bias=False), nn.PReLU(), nn.Linear(64, 128, bias=False), nn.PReLU(),
                       nn.Linear(128, 2, bias=False), nn.Softmax(dim=-1))


def l2_normalize(x, eps=1e-12):
  return x / torch.sqrt(torch.clamp((x * x).sum(-1, keepdim=True), min=eps * eps))


def hvsa_loss(images, texts, weighting, loss_config):
  """losses/hvsa.py's Objective: the difficulty-weighted triplet of the cosine scores plus the Gaussian-kernel
  uniformity of every `uniformity_stride`-th image embedding, mixed by the learned weighting (or summed)."""
  c = loss_config
  scores = l2_normalize(images) @ l2_normalize(texts).T
  negatives = ~torch.eye(scores.shape[0], dtype=torch.bool)
  positives = scores.diagonal()

  def difficulty_weighted(cost):
    cost = torch.where(negatives, cost.clamp(min=0), 0.0)
    return (cost * torch.exp(-c.beta * cost)).sum()

  align = (difficulty_weighted(c.margin + scores - positives[:, None])
           + difficulty_weighted(c.margin + scores - positives[None, :])) / scores.shape[0] ** 2
  x = l2_normalize(images[::c.uniformity_stride])
  squares = (x * x).sum(-1)
  sq_dist = squares[:, None] + squares[None, :] - 2 * x @ x.T
  distinct = ~torch.eye(x.shape[0], dtype=torch.bool)
  unif = torch.where(distinct, torch.exp(-c.gamma * sq_dist.clamp(min=0)), 0.0).sum() / distinct.sum()
  if c.uniformity == "log":
    unif = unif.log()
  losses = torch.stack([align, unif])
  weights = weighting(losses) if c.auto_weighting else torch.ones_like(losses)
  return weights @ losses


def pytorch_calls(config, batch):
  """{part: a call of the PyTorch mirror's part}, and its parameter count."""
  m, opt = config.model, config.optimizer
  memory_format = torch.channels_last if _CHANNELS_LAST.value else torch.contiguous_format
  image_tower = ImageTower(m.resnet_width, m.kea_slots, m.embed_dim).to(memory_format=memory_format).train()
  text_tower = TextTower(_VOCAB.value, m.word_dim, m.hidden_dim, m.text_dropout, m.embed_dim).train()
  weighting = auto_weighting()
  params = [p for module in (image_tower, text_tower, weighting) for p in module.parameters()]
  optimizer = torch.optim.AdamW(params, lr=opt.lr, betas=(opt.b1, opt.b2), eps=opt.eps, weight_decay=opt.weight_decay)
  images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
  tokens, lengths = (torch.from_numpy(batch[k]).long() for k in ("tokens", "lengths"))
  steps = int(lengths.max())
  embeddings = [torch.randn(len(lengths), m.embed_dim, requires_grad=True) for _ in range(2)]

  def tower_grad(tower, *inputs):
    return lambda: torch.autograd.grad(tower(*inputs).square().sum(), list(tower.parameters()))

  def train_step():
    optimizer.zero_grad()
    hvsa_loss(image_tower(images), text_tower(tokens, lengths, steps), weighting, config.loss).backward()
    optimizer.step()

  calls = {"image": tower_grad(image_tower, images),
           "text": tower_grad(text_tower, tokens, lengths, steps),
           "loss": lambda: torch.autograd.grad(hvsa_loss(*embeddings, weighting, config.loss),
                                               [*embeddings, *weighting.parameters()]),
           "optimizer": optimizer.step,
           "step": train_step}
  for p in params:
    p.grad = torch.randn_like(p)  # the optimizer part's random gradients (the whole step zeroes them first)
  return calls, sum(p.numel() for p in params)


# --- Report ---------------------------------------------------------------------------------------------------------

def training_source(config):
  """hvsa_speed.py's synthetic RSITMD-layout training split (written with --write_data and built on first use), or
  None when it is absent and --nowrite_data."""
  if _WRITE_DATA.value:
    hvsa_speed.write_dataset(hvsa_speed.dataset_dir())
  elif not (hvsa_speed.dataset_dir() / rsitmd.Rsitmd.JSON_NAME).exists():
    return None
  return sources.open_split(config.dataset, config.dataset.train_split)


def cells(project, pytorch):
  """The ms columns and their ratio (left blank unless both are positive)."""
  ratio = f"{project / pytorch:.2f}" if project > 0 and pytorch > 0 else ""
  return f"{project:.1f} | {pytorch:.1f} | {ratio}"


def print_table(config, batch, project, pytorch, input_ms, params):
  lengths = batch["lengths"]
  batch_size, steps = len(lengths), int(lengths.max())
  torch_layout = "channels_last" if _CHANNELS_LAST.value else "NCHW"
  print(f"\nHVSA configs/hvsa.py:rsitmd, batch {batch_size}, {config.dataset.image_size} px, vocabulary "
        f"{_VOCAB.value}, caption lengths mean {lengths.mean():.1f} / max {steps} words; jax {jax.__version__} "
        f"({jax.devices()[0].platform}), torch {torch.__version__} ({torch.get_num_threads()} threads, "
        f"{torch_layout}); CPU {hvsa_speed.cpu_model()} ({os.cpu_count()} cores, load average {os.getloadavg()[1]:.1f} "
        f"over the last 5 min); parameters {params[0]:,} (project), {params[1]:,} (PyTorch)\n")
  other = {name: parts["step"] - sum(parts[k] for k in ("image", "text", "loss", "optimizer"))
           for name, parts in (("project", project), ("pytorch", pytorch))}
  print("| part | project ms | PyTorch ms | project / PyTorch |\n|---|---:|---:|---:|")
  print(f"| 1. image tower fwd+bwd | {cells(project['image'], pytorch['image'])} |")
  print(f"| 2. text tower fwd+bwd ({steps} GRU steps) | {cells(project['text'], pytorch['text'])} |")
  print(f"| 3. loss + learned weighting fwd+bwd | {cells(project['loss'], pytorch['loss'])} |")
  print(f"| 4. optimizer update (AdamW, all parameters) | {cells(project['optimizer'], pytorch['optimizer'])} |")
  print(f"| 5. whole train step | {cells(project['step'], pytorch['step'])} |")
  print(f"| other = 5 - (1+2+3+4) | {cells(other['project'], other['pytorch'])} |")
  print(f"| 6. host/input (one loader batch) | {'n/a' if input_ms is None else f'{input_ms:.1f}'} | n/a | |")
  print(f"\nEach part is timed alone (ms per step, median of {_REPS.value} calls after {WARMUP_CALLS} warm-up "
        "calls, the project's alternating with PyTorch's); the parts overlap inside the whole step (XLA fuses and "
        "schedules across them), so they need not add up exactly. "
        f"Host/input: the project's loader (grain workers {config.input.worker_count}, `{config.input.pp_train}`) on "
        f"{hvsa_speed.dataset_dir()}; the trainer runs it in a prefetch thread beside the step, on the same cores. "
        "PyTorch's input pipeline is timed by an external harness.", flush=True)


def main(argv):
  del argv
  torch.set_num_threads(TORCH_THREADS)
  torch.manual_seed(0)
  batches = [int(b) for b in flags.FLAGS.batches]  # hvsa_speed.py's flag
  source = training_source(hvsa_speed.make_config(batches[0]))
  for batch_size in batches:
    config = hvsa_speed.make_config(batch_size)
    batch = random_batch(config, batch_size, _VOCAB.value, np.random.default_rng(0))
    input_ms = None if source is None else loader_ms(config, source, _REPS.value)
    (project, project_params), (pytorch, pytorch_params) = project_calls(config, batch), pytorch_calls(config, batch)
    ms = {"project": {}, "pytorch": {}}
    for part in PARTS:
      timed = median_ms({"project": project[part], "pytorch": pytorch[part]}, _REPS.value)
      for side, value in timed.items():
        ms[side][part] = value
    print_table(config, batch, ms["project"], ms["pytorch"], input_ms, (project_params, pytorch_params))


if __name__ == "__main__":
  app.run(main)
