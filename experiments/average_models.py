r"""Weight-averages models fine-tuned from the same start ("model soup"): one model whose
parameters are the weighted mean of the given models' parameters, exported like
`experiments.export_model` does.

  python -m experiments.average_models \
      --models=R/r10k_base_best,R/r10k_robust_best --weights=0.5,0.5 \
      --output=R/soup_base_robust --name=soup_base_robust

Issue #28 item 2: two recipes fine-tuned from the shipped default (one better on strong
yaw, the other under blur, rotation and occlusion) average into one model with no training.
Averaging is only meaningful for models that share a start (the same pre-trained model,
fine-tuned a few thousand steps): the models must have the same config and mean shape,
and the parameters of models trained apart from different starts average to nonsense (this
tool cannot tell; measure the soup with `experiments.robust_val`). A factored recurrent
layer (--recurrent_rank) averages its two factors, not their product: close to the product's
average for fine-tunes that moved little from one start, and what the measurement
measures. A 34-patch model that a 68-patch run grew from (--init_from) may be averaged
with it (listed after it): it is grown first, its new patches' recurrent rows zero.
The soup gets no quit head and no `default_t_fail`: fit them on val
(`experiments.fit_quit_head --install`, `experiments.choose_t_fail --install`).
"""
from __future__ import annotations

import dataclasses
import math
import sys

import jax
import numpy as np
from absl import app
from absl import flags

from experiments import common
from experiments import export_model
from musica_jax import factorise
from musica_jax import model_io

FLAGS = flags.FLAGS


def define_flags() -> None:
  d = common.define_flag
  d("list", "models", None, "Exported model directories (or 'default') to average.",
    required=True)
  d("list", "weights", None, "One non-negative weight per model (normalised to sum to "
    "1); default: equal weights.")
  d("string", "output", None, "Model directory to write (created).", required=True)
  d("enum", "dtype", "float32", "Parameter storage dtype.", enum_values=list(model_io.DTYPES))
  d("string", "name", None, "Optional model name stored in the metadata.")
  d("string", "eval_json", None, "Optional evaluation JSON (experiments.evaluate) of the "
    "averaged model to store in the metadata.")


def normalised_weights(weights, count: int) -> list[float]:
  """`weights` (strings or numbers; empty: equal) scaled to sum to 1; ValueError when
  their number differs from `count` or one is negative, not finite, or all are zero."""
  if not weights:
    return [1.0 / count] * count
  try:
    w = [float(x) for x in weights]
  except (TypeError, ValueError) as e:
    raise ValueError(f"weights must be numbers, got {list(weights)!r}") from e
  if len(w) != count:
    raise ValueError(f"{len(w)} weights for {count} models")
  if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
    raise ValueError(f"weights must be finite, non-negative and not all zero, got {w}")
  return [x / sum(w) for x in w]


def average(models: list[model_io.LoadedModel], weights: list[float]):
  """The weighted mean of the models' parameters (float32), in the first model's config.
  A model with a smaller patch set that the first grew from (training's --init_from: the
  new patches' recurrent rows zero, `factorise.convert_params`) is grown first. ValueError
  when a model cannot be brought to the first's config or its mean shape differs."""
  if len(models) < 2:
    raise ValueError("averaging needs at least two models")
  first = models[0]
  cfg = first.model_config
  trees = [first.params]
  for m in models[1:]:
    if not np.allclose(m.mean_shape, first.mean_shape, atol=1e-2):
      raise ValueError(f"{m.path}: its mean shape differs from {first.path}'s")
    if m.model_config == cfg:
      trees.append(m.params)
    elif (m.model_config.recurrent_rank == cfg.recurrent_rank
          and factorise.grows_patches(m.model_config, cfg)):
      trees.append(factorise.convert_params(m.params, m.model_config, cfg)[0])
    else:
      diff = {k: (v, getattr(m.model_config, k))
              for k, v in dataclasses.asdict(cfg).items() if getattr(m.model_config, k) != v}
      raise ValueError(f"{m.path}: its config differs from {first.path}'s: {diff}")
  return jax.tree_util.tree_map(
      lambda *leaves: sum(w * np.asarray(x, np.float64) for w, x in zip(weights, leaves)
                          ).astype(np.float32), *trees)


def main(argv):
  common.start(argv)
  common.check_output(FLAGS.output, "output", "dir")
  if len(FLAGS.models) < 2:
    raise app.UsageError(f"--models: give at least two models, got {FLAGS.models}")
  try:
    weights = normalised_weights(FLAGS.weights, len(FLAGS.models))
  except ValueError as e:
    raise app.UsageError(f"--weights: {e}") from None
  evaluation = export_model.read_eval_json(FLAGS.eval_json) if FLAGS.eval_json else None
  models = [common.load_model(None, path) for path in FLAGS.models]
  try:
    params = average(models, weights)
  except ValueError as e:
    raise app.UsageError(f"--models: {e}") from None
  meta = {"averaged_from": [{"model": p, "weight": w, "metadata": m.metadata}
                            for p, w, m in zip(FLAGS.models, weights, models)],
          "exported_with": "python -m experiments.average_models " + " ".join(sys.argv[1:])}
  if FLAGS.name:
    meta["name"] = FLAGS.name
  if evaluation is not None:
    meta["evaluation"] = evaluation
  out = model_io.save_model(FLAGS.output, params, models[0].model_config,
                            models[0].mean_shape, meta, dtype=FLAGS.dtype)
  print(f"wrote {out}: " + " + ".join(f"{w:.3g} x {p}" for p, w in zip(FLAGS.models, weights)))


if __name__ == "__main__":
  define_flags()
  common.run(main)
