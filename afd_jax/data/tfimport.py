"""TensorFlow for the input pipeline only: imported lazily, quietly, never given an accelerator.

Quietly, unless the user asks for the libraries' own logs (`--verbosity`, or AFD_VERBOSE=1: see
`afd_jax.errors.verbose`): TensorFlow's C++ log shows errors only (TF_CPP_MIN_LOG_LEVEL=2
unless it is set to 0 or 3), and the log lines TensorFlow writes while it loads, which ignore
that level (its logging banner and oneDNN notice), are dropped; errors and anything else pass.
"""
import contextlib
import logging
import os
import re
import sys
import threading

from afd_jax.errors import verbose

# An INFO or WARNING line of TensorFlow's C++ log ("I0000 00:00:1796410449.681831 7108
# port.cc:153] ..."), or absl's banner before its log is set up. Errors (E, F) always pass.
_TF_LOG_LINE = re.compile(r'([IW]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] |WARNING: All log '
                          r'messages before absl::InitializeLog\(\) is called)')


@contextlib.contextmanager
def _without_tf_log_lines():
  """While the block runs, fd 2 goes through a pipe whose lines a thread passes on to stderr as
  they come, all but TensorFlow's INFO and WARNING log lines (so a fatal error while TensorFlow
  loads is still printed). No stderr fd, or no pipe: the block runs as it is."""
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (OSError, AttributeError, ValueError):  # no stderr fd to redirect
    yield
    return
  try:
    read_end, write_end = os.pipe()
  except OSError:
    os.close(saved)
    yield
    return

  def pass_on():
    with os.fdopen(read_end, 'rb') as lines:
      for line in lines:
        if not _TF_LOG_LINE.match(line.decode(errors='replace')):
          os.write(saved, line)

  thread = threading.Thread(target=pass_on, daemon=True)
  thread.start()
  os.dup2(write_end, 2)
  os.close(write_end)
  try:
    yield
  finally:
    with contextlib.suppress(OSError, ValueError):
      sys.stderr.flush()  # Python's own lines of the block, in order with the rest
    os.dup2(saved, 2)  # closes the pipe's last write end: the thread reads to its end
    thread.join(timeout=5)
    os.close(saved)


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
