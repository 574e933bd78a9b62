"""agad: attention-guided adversarial defenses in JAX/Flax."""

__version__ = "0.1.0"


def load(*args, **kwargs):
  """See ``agad.api.load`` (imported lazily: ``import agad`` stays cheap)."""
  from agad import api  # lazy: `import agad` loads no JAX

  return api.load(*args, **kwargs)


def make_logits_fn(*args, **kwargs):
  """See ``agad.api.make_logits_fn``."""
  from agad import api  # lazy: `import agad` loads no JAX

  return api.make_logits_fn(*args, **kwargs)
