"""The contract of a method's objective: `rsalign_jax.losses.<name>.Objective`, a subclass of `Objective`.

`Objective(**config.loss)(outputs, batch) -> (loss, metrics)`: `outputs` is the model's `__call__` dict, `batch` the
global batch (`image`, `tokens`, `lengths`, `image_id` and the per-image fields the model and the objective declare);
`loss` is a float32 scalar and `metrics` a dict of float32 scalars. Learned parts (temperatures, loss weights) are
its parameters, trained with the model's. `batch_fields` declares the per-image dataset fields
(rsalign_jax.data.fields) the objective reads; the trainer puts them, with the model's, into every batch.
`from_config(loss_config, tokenizer)` builds it; an objective that needs token ids (AMFMN's `<unk>`) takes them from
the tokenizer there.
"""
import flax.linen as nn

from rsalign_jax import registry


class Objective(nn.Module):
  """Base of every method's objective; `batch_fields` is () unless the subclass declares fields it reads."""

  @property
  def batch_fields(self) -> tuple[str, ...]:
    return ()

  @classmethod
  def from_config(cls, loss_config: dict, tokenizer) -> "Objective":
    """The objective of `config.loss`; tokenizer: the run's (None where there is none, e.g. random-id benchmarks)."""
    del tokenizer
    return cls(**loss_config)


def objective_class(name: str) -> type[Objective]:
  """`rsalign_jax.losses.<name>.Objective`, checked to keep the contract."""
  return registry.find_class("rsalign_jax.losses", name, "Objective", field="loss_name",
                             is_valid=lambda cls: issubclass(cls, Objective),
                             expected="subclassing rsalign_jax.losses.base.Objective")
