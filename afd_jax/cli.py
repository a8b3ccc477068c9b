"""What afd_jax's command lines share: absl's `app.run`, and an exit without a last garbage
collection.

At exit the interpreter garbage-collects every object TensorFlow and JAX created, millions of
them: 3-4 s on a 2-core CPU after the run's work is done. Frozen instead, those objects are left
to the operating system. Every exit handler still runs; what no longer runs is the finaliser
(`__del__`) of an object caught in a reference cycle, which Python never promised at exit. afd_jax
closes what it writes (checkpoints, event files, summaries) explicitly, before exit.
"""
import atexit
import gc

from absl import app


def exit_without_final_gc() -> None:
  """Freezes the heap at exit: after the exit handlers registered from now on (those of the run),
  before those registered earlier (at import: JAX's clean-up and multi-host shutdown, logging's
  flush), which all still run."""
  atexit.register(gc.freeze)


def run(main, **kwargs) -> None:
  """`absl.app.run(main, **kwargs)`, exiting without the last garbage collection."""
  exit_without_final_gc()
  app.run(main, **kwargs)
