"""TensorFlow for the input pipeline only: imported lazily, quietly, never given an accelerator.

Quietly, unless the user asks for the libraries' own logs (`--verbosity`, or AFD_VERBOSE=1: see
`afd_jax.errors.verbose`): TensorFlow's C++ log shows errors only (TF_CPP_MIN_LOG_LEVEL=2
unless it is set to 0 or 3), and the log lines TensorFlow writes while it loads, which ignore
that level (its logging banner and oneDNN notice), are dropped; anything else is passed on.
"""
import contextlib
import logging
import os
import re
import sys
import tempfile

from afd_jax.errors import verbose

# A C++ log line of TensorFlow/absl ("I0000 00:00:1796410449.681831    7108 port.cc:153] ...").
_TF_LOG_LINE = re.compile(r'([IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] |WARNING: All log '
                          r'messages before absl::InitializeLog\(\) is called)')


@contextlib.contextmanager
def _without_tf_log_lines():
  """stderr (fd 2) into a file while the block runs; then its lines, but for TensorFlow's own log
  lines, go to stderr (every line where the block raised)."""
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (OSError, AttributeError, ValueError):  # no stderr to redirect
    saved = None
  if saved is None:
    yield
    return
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    failed = True
    try:
      yield
      failed = False
    finally:
      with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()  # Python's own lines of the block, in order with the rest
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      lines = capture.read().decode(errors='replace').splitlines(keepends=True)
      kept = ''.join(l for l in lines if failed or not _TF_LOG_LINE.match(l))
      if kept:
        sys.stderr.write(kept)
        sys.stderr.flush()


if not verbose() and os.environ.get('TF_CPP_MIN_LOG_LEVEL', '1') == '1':  # JAX sets 1 at import
  os.environ['TF_CPP_MIN_LOG_LEVEL'] = '2'  # warnings and INFO lines off; a user's 0 or 3 is kept
with (contextlib.nullcontext() if verbose() else _without_tf_log_lines()):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

try:
  tf.config.set_visible_devices([], 'GPU')  # JAX owns the accelerators.
except RuntimeError:  # TensorFlow was initialised before us; nothing to hide any more.
  pass


class _DropTfdsDeprecation(logging.Filter):
  """TFDS 4.9.10 reads its own deprecated `FeatureConnector.dtype` and warns about it."""

  def filter(self, record):
    return 'FeatureConnector.dtype' not in record.getMessage()


logging.getLogger('absl').addFilter(_DropTfdsDeprecation())
