"""Attention-link heatmaps: mean attention, teacher layers (rows) x student layers (columns)."""
import io
from typing import Sequence

import numpy as np
from etils import epath


def plot_attention(attention: np.ndarray, teacher_labels: Sequence[str],
                   student_labels: Sequence[str], path: str, title: str = '') -> str:
  """Writes a PNG heatmap of `attention` (T x S) to `path` (atomically) and returns the path."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  attention = np.asarray(attention)
  t, s = attention.shape
  fig, ax = plt.subplots(figsize=(1.6 + 0.45 * s, 1.2 + 0.3 * t))
  image = ax.imshow(attention, cmap='viridis', vmin=0.0, aspect='auto')
  ax.set_xticks(range(s), list(student_labels), rotation=60, ha='right', fontsize=7)
  ax.set_yticks(range(t), list(teacher_labels), fontsize=7)
  ax.set_xlabel('student layer')
  ax.set_ylabel('teacher layer')
  if title:
    ax.set_title(title, fontsize=9)
  fig.colorbar(image, ax=ax, fraction=0.05, label='mean attention')
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=120)
  plt.close(fig)
  out = epath.Path(path)  # local or GCS
  tmp = out.with_name(out.name + '.tmp')
  tmp.write_bytes(buffer.getvalue())
  tmp.replace(out)
  return path
