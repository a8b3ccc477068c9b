"""Training-pipeline throughput: `python -m afd_jax.data.bench [--batches N]`.

CIFAR-style augmentation (4-pixel zero padding + random crop + flip + mean/std normalisation) of
synthetic 32x32x3 uint8 images held in memory (so no download), batch 256, through the pipeline
that training uses; prints images/s from the median time per batch after a warm-up.
"""
import argparse
import time

import numpy as np

from afd_jax.data import pipeline, stats
from afd_jax.data.augment import Augment


def run(num_batches: int = 500, warmup: int = 50, batch_size: int = 256,
        num_examples: int = 50_000) -> dict:
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num_examples, 32, 32, 3), np.uint8)
  labels = rng.integers(0, 100, num_examples).astype(np.int32)
  augment = Augment('cifar', 32, 4, True, stats.CIFAR100_MEAN, stats.CIFAR100_STD, (32, 32, 3), 3)
  stream = pipeline.Stream(seed=0, shard=0, batch_size=batch_size,
                           steps_per_epoch=num_examples // batch_size, start_step=0)
  batches = pipeline.memory_batches(images, labels, stream, augment)
  for _ in range(warmup):
    next(batches)
  times = []
  start = time.perf_counter()
  for _ in range(num_batches):
    t = time.perf_counter()
    next(batches)
    times.append(time.perf_counter() - t)
  total = time.perf_counter() - start
  return {'median_images_per_s': batch_size / float(np.median(times)),
          'mean_images_per_s': batch_size * num_batches / total}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batches', type=int, default=500, help='timed batches')
  parser.add_argument('--warmup', type=int, default=50, help='untimed batches first')
  args = parser.parse_args()
  result = run(args.batches, args.warmup)
  print(f"CIFAR-style training pipeline (32x32x3, batch 256): "
        f"{result['median_images_per_s']:,.0f} images/s (median over {args.batches} batches; "
        f"mean {result['mean_images_per_s']:,.0f} images/s)")


if __name__ == '__main__':
  main()
