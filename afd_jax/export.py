"""Exports a run's trained model (its latest readable checkpoint) as one Flax msgpack file.

  python -m afd_jax.export --workdir=DIR --model=resnet20 --out=resnet20.msgpack

The file holds only the model's variables (no optimizer state); `config.teacher.checkpoint` and
`config.student.init_checkpoint` accept it. The quick-start's teacher was made this way.
"""
import os
import sys

from absl import flags, logging

from afd_jax import checkpoint, cli, weights
from afd_jax.errors import UserError

_WORKDIR = flags.DEFINE_string('workdir', None, 'A run folder with checkpoints/.')
_MODEL = flags.DEFINE_string('model', None, 'The model name the run trained (checked).')
_OUT = flags.DEFINE_string('out', None, 'The .msgpack file to write (must not exist).')
flags.mark_flags_as_required(['workdir', 'model', 'out'])


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  try:
    if not _OUT.value.endswith('.msgpack'):
      raise UserError(f'--out must end in .msgpack, got {_OUT.value}.')
    if os.path.exists(_OUT.value):
      raise UserError(f'{_OUT.value} exists; not overwriting it.')
    if not checkpoint.has_checkpoints(_WORKDIR.value):
      raise UserError(f'{_WORKDIR.value} has no checkpoints.')
    weights.export_variables(_WORKDIR.value, _OUT.value, _MODEL.value)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'wrote {_OUT.value} ({os.path.getsize(_OUT.value) / 1e6:.2f} MB)')


if __name__ == '__main__':
  cli.run(main)
