"""Command line: train or distil from a config file.

  python -m afd_jax.main --config=configs/<file>.py[:args] --workdir=DIR [--config.key=value ...]

Rerunning the same command with the same --workdir resumes from its latest checkpoint.
TensorFlow's and Orbax's own log lines stay off the console unless asked for: any explicit
`--verbosity` (e.g. `--verbosity=0`, absl's INFO and up) or the environment variable
AFD_VERBOSE=1.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from afd_jax import checkpoint, cli, train
from afd_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (.py[:args]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for checkpoints, logs and summary.json.')
flags.mark_flags_as_required(['config', 'workdir'])

def _one_line(error: BaseException) -> str:
  """One line from a flag/config error. absl and ml_collections wrap the config file's own
  exception, its traceback text included: take the outer message if it is one line, else the
  innermost cause; an unknown key keeps ml_collections' did-you-mean hint."""
  chain = [error]
  while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  keys = [e for e in chain if isinstance(e, KeyError) and e.args]
  if keys:
    text = str(keys[0].args[0]).replace('\n', ' ').replace('\\n', ' ')
    return f'unknown config key {" ".join(text.split())}'
  outer = str(chain[0]).strip()
  if outer and '\n' not in outer:
    return outer
  return ' '.join(str(chain[-1]).split())


def parse_flags(argv):
  """absl's parsing, but a bad flag, config file or config key is one line and exit code 2."""
  try:
    remaining = flags.FLAGS(argv)
    _CONFIG.value.to_dict()  # A config that failed to load raises only when used.
  except Exception as e:  # pylint: disable=broad-except
    print(f'error: {_one_line(e)}', file=sys.stderr, flush=True)
    sys.exit(2)
  return remaining


def disk_full_line(error: BaseException) -> str:
  """The one line for a full disk that no checkpoint save reported: the file, if known, and
  the space left in the workdir."""
  path = next((e.filename for e in _chain(error) if getattr(e, 'filename', None)), None)
  free = checkpoint.free_bytes(_WORKDIR.value)
  return (f'no space left on device' + (f' writing {path}' if path else '')
          + (f' ({free:,} bytes free in {_WORKDIR.value})' if free is not None else '')
          + '. Free some space and rerun the same command to resume from the last complete '
          'checkpoint.')


def _chain(error: BaseException):
  seen = []
  while error is not None and error not in seen:
    seen.append(error)
    error = error.__cause__ or error.__context__
  return seen


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Our progress lines go to stdout; -v 0 for INFO logs.
  try:
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)
  except Exception as e:  # pylint: disable=broad-except
    if not checkpoint.is_disk_full(e):
      raise
    # A full disk outside a checkpoint save (TensorBoard events, attention maps): one line too.
    print(f'error: {disk_full_line(e)}', file=sys.stderr, flush=True)
    sys.exit(2)
  if summary['status'] == 'preempted':
    sys.exit(train.PREEMPTED_EXIT_CODE)


if __name__ == '__main__':
  cli.run(main, flags_parser=parse_flags)
