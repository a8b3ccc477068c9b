"""Bad user input and warnings: the CLI prints a UserError's message as one line."""
import jax
from absl import logging


class UserError(Exception):
  """Bad input (config, dataset, checkpoint, flags): one clear message, non-zero exit."""


def warn(message: str) -> None:
  """A warning on the console of process 0 (and in the absl log of every process)."""
  if jax.process_index() == 0:
    print(f'WARNING: {message}', flush=True)
  else:
    logging.warning(message)
