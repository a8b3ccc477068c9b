"""Our TFDS builders for datasets that need no download (imported lazily: they import TFDS)."""
