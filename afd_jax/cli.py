"""What afd_jax's command lines share: absl's `app.run`, and an exit without a last garbage
collection.

At exit the interpreter garbage-collects every object TensorFlow and JAX created, millions of
them: 3-4 s on a 2-core CPU after the run's work is done. Frozen first, those objects are left to
the operating system. Every exit handler still runs (files, checkpoints and event files are
closed explicitly before that anyway).
"""
import atexit
import gc

from absl import app


def exit_without_final_gc() -> None:
  """Freezes the heap at exit, after the exit handlers registered from now on have run."""
  atexit.register(gc.freeze)


def run(main, **kwargs) -> None:
  """`absl.app.run(main, **kwargs)`, exiting without the last garbage collection."""
  exit_without_final_gc()
  app.run(main, **kwargs)
