"""Bad user input and warnings: the CLI prints a UserError's message as one line. And whether
the libraries' own log lines (TensorFlow's C++ log, Orbax's) may reach the console."""
import os

import jax
from absl import flags, logging

VERBOSE_ENV = 'AFD_VERBOSE'  # AFD_VERBOSE=1: show TensorFlow's and Orbax's own log lines


class UserError(Exception):
  """Bad input (config, dataset, checkpoint, flags): one clear message, non-zero exit."""


class DiskFull(UserError):
  """A write failed for want of space: the message names the path and the bytes left."""


def verbose() -> bool:
  """Did the user ask for the libraries' own log lines: an explicit `--verbosity` (`-v`) flag,
  or AFD_VERBOSE set to anything but 0? Otherwise they stay off the console."""
  if os.environ.get(VERBOSE_ENV, '').strip() not in ('', '0'):
    return True
  return (flags.FLAGS.is_parsed() and 'verbosity' in flags.FLAGS
          and bool(flags.FLAGS['verbosity'].present))


def warn(message: str) -> None:
  """A warning on the console of process 0 (and in the absl log of every process)."""
  if jax.process_index() == 0:
    print(f'WARNING: {message}', flush=True)
  else:
    logging.warning(message)
