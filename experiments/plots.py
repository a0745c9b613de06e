"""Plots people would rather look at than read (matplotlib, headless)."""
from __future__ import annotations

import pathlib

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from musica_jax import metrics


def ced_plot(curves: dict, path, threshold: float = 0.10, title: str = "") -> None:
  """Cumulative error distribution, one line per named array of per-face NMEs."""
  fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
  for name, nme in curves.items():
    x, y = metrics.ced(nme, threshold)
    ax.plot(x * 100, y, label=f"{name} (NME {np.mean(nme) * 100:.2f}%, "
                              f"AUC {metrics.auc(nme, threshold):.3f})")
  ax.set_xlabel("NME, inter-ocular (%)")
  ax.set_ylabel("fraction of faces")
  ax.set_xlim(0, threshold * 100)
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
