"""STPG semi-supervised semantic segmentation in JAX/Flax.

``from stpg_jax import losses`` gives the method's losses as pure JAX functions; ``stpg_jax.load_model(path)``
reads an exported Gen-Student.
"""

__version__ = "0.1.0"


def load_model(path):
    """(model, variables, meta) of an exported Gen-Student (see stpg_jax.export)."""
    from stpg_jax.export import load_model as _load

    return _load(path)
