r"""Grid of augmented training crops with their landmarks drawn.

  python -m experiments.show_batch --flagfile=FLAGS --output=batch.png [--num_images=16]

Landmarks are drawn as dots coloured by face part (scheme groups), so a flip that did not
permute the points (left eye drawn in right-eye colour) is visible.
"""
from __future__ import annotations


from absl import app
from absl import flags
from absl import logging
import numpy as np
from PIL import Image, ImageDraw

from data_pipelines import input_pipeline
from experiments import common  # shared flags, flagfile lookup
from experiments import config_flags
from musica_jax import schemes

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when run as a program)."""
  d = common.define_flag
  d("string", "output", "", "PNG path to write.")
  d("integer", "num_images", 16, "Crops to draw (one training batch).")
  d("integer", "start_step", 0, "Training step whose batch is drawn.")


_COLOURS = [(255, 60, 60), (60, 255, 60), (60, 140, 255), (255, 255, 60), (255, 60, 255),
            (60, 255, 255), (255, 160, 40), (160, 90, 255), (255, 255, 255), (140, 255, 140)]


def draw_grid(images: np.ndarray, landmarks: np.ndarray, num_points: int) -> Image.Image:
  scheme = schemes.get_scheme(num_points)
  colour = np.zeros((num_points, 3), np.int64)
  for g, (name, idx) in enumerate(scheme.groups.items()):
    colour[list(idx)] = _COLOURS[g % len(_COLOURS)]
  tiles = []
  for img, pts in zip(images, landmarks):
    lo, hi = img.min(), img.max()
    im = Image.fromarray(((img - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for (x, y), c in zip(pts, colour):
      d.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=tuple(int(v) for v in c))
    tiles.append(np.asarray(im))
  cols = int(np.ceil(np.sqrt(len(tiles))))
  rows = int(np.ceil(len(tiles) / cols))
  h, w = tiles[0].shape[:2]
  grid = np.zeros((rows * (h + 2), cols * (w + 2), 3), np.uint8)
  for i, t in enumerate(tiles):
    r, c = divmod(i, cols)
    grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = t
  return Image.fromarray(grid)


def main(argv):
  del argv
  if not FLAGS.output:
    raise app.UsageError("--output is required (a .png path)")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  cfg = config_flags.data_config_from_flags()
  batch = next(input_pipeline.train_iterator(cfg, start_step=FLAGS.start_step))
  n = min(FLAGS.num_images, len(batch["image"]))
  draw_grid(batch["image"][:n], batch["landmarks"][:n], cfg.num_points).save(FLAGS.output)
  print(f"wrote {FLAGS.output} ({n} crops, dataset {cfg.dataset}, split {cfg.train_split})")


if __name__ == "__main__":
  define_flags()
  common.run(main)
