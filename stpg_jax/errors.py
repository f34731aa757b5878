"""The package's own error types that more than one module raises (each module's others stay beside it:
``config.ConfigError``, ``data.DataError``, ``checkpoint.CheckpointError``, ``models.pretrained.WeightsMismatchError``,
``sharding.LaunchError``). ``stpg_jax.cli`` turns each into one line and an exit status."""


class InputError(ValueError):
    """A command-line argument that cannot be used; the message names it and what was expected."""


class NonFiniteLossError(FloatingPointError):
    """Training diverged: a non-finite loss or state; the message says which checkpoint is kept."""
