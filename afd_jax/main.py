"""Command line: train or distil from a config file.

  python -m afd_jax.main --config=configs/<file>.py[:args] --workdir=DIR [--config.key=value ...]

Rerunning the same command with the same --workdir resumes from its latest checkpoint.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from afd_jax import train
from afd_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (.py[:args]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for checkpoints, logs and summary.json.')
flags.mark_flags_as_required(['config', 'workdir'])

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: stopped early, a checkpoint was saved; rerun to resume.


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
  if summary['status'] == 'preempted':
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == '__main__':
  app.run(main)
