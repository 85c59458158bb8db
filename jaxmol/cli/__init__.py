"""The command-line entry points (`train`, `evaluate`) and their shared set-up."""

import logging


def setup_logging() -> None:
    """Our progress at INFO; orbax (logs through absl) and JAX internals only when something is
    wrong."""
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax").setLevel(logging.WARNING)
