"""Finding a method's pieces by module path: `<package>.<name>` holds the class a config names.

Models (`rsalign_jax.models.<model_name>.Model`), objectives (`rsalign_jax.losses.<loss_name>.Objective`) and
evaluators (`rsalign_jax.evaluation.evaluators.<type>.Evaluator`) are all looked up here, so a new one is a new
module, and a misspelt name or a module without the class is the same one-line error everywhere.
"""
import importlib
import pkgutil


def find_class(package, name, attribute, *, field, is_valid, expected, listed_as=""):
  """`<package>.<name>.<attribute>`, checked by `is_valid(cls)`.

  field: the config field that named it (for the errors); expected: what `attribute` must be, e.g. 'subclassing
  rsalign_jax.models.base.RetrievalModel'; listed_as: for a package holding only such modules, what the error
  calls the list of their names (e.g. 'types').
  """
  module_name = f"{package}.{name}"
  path = module_name.replace(".", "/")
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name != module_name:
      raise
    known = ""
    if listed_as:
      names = sorted(info.name for info in pkgutil.iter_modules(importlib.import_module(package).__path__))
      known = f"; known {listed_as}: {names}"
    raise ValueError(f"{field}={name!r}: no module {path}.py{known}") from None
  cls = getattr(module, attribute, None)
  if not (isinstance(cls, type) and is_valid(cls)):
    raise TypeError(f"{field}={name!r}: {path}.py has no {attribute} {expected}")
  return cls
