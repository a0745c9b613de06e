r"""A per-face quality score that stays honest off the training distribution (issue #28
item 4): fitted on val + robust-val, measured held out (`experiments.quality_features`; an
experiment, not shipped: the predictor does not read it).

  nice -n 19 python -m experiments.quality_score --flagfile=300w34.flags --model=default \
      --output_json=results/quality_score_default.json \
      --output_md=results/quality_score_default.md \
      --features_cache=/tmp/quality_features_default.npz

Each face of --split (val; a test split is refused) under every --conditions
(data_pipelines.robust_val, seeded by --seed) through the predictor's crop and the full
cascade; per face the features of experiments.quality_features (E, the previous
iteration's E, the last step, the shape against the statistics of the training faces of the
data flag --train_split (train_fit), roll, size, centre); a ridge regression of log
inter-ocular NME on them; a face is flagged when the score >= Tf. Reported per condition, held out
(--folds folds by photo: fit and Tf on the other folds), next to E alone with its own Tf
chosen the same way, and leaving each condition out of the fit; then the score fitted on
every face (in sample).
"""
from __future__ import annotations

import json
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags

from experiments import robust_val
from experiments import common
from experiments import config_flags
from experiments import quality_features
from experiments import quality_score_lib
from musica_jax import atomic_io

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when run as a program)."""
  robust_val.define_condition_flags("Faces to fit and measure on (a validation split).")
  d = common.define_flag
  d("integer", "folds", 2, "Cross-fitting folds (by photo; 2: robust_val's folds).")
  d("list", "other_folds", ["5"], "Also summarise the held-out measure with these numbers "
    "of folds.")
  d("integer", "shape_components", 10, "PCA components of the training shapes.")
  d("float", "ridge", 1.0, "Ridge penalty of the regression (standardised features).")
  d("list", "features", list(quality_features.FEATURES),
    "Features of experiments.quality_features to use.")
  d("string", "features_cache", None, "Cache the cascade's per-face outputs in this .npz "
    "(reused when the model, data and conditions match).")
  d("string", "output_json", None, "Where to write the JSON (required unless --from_json).")
  d("string", "output_md", None, "Also write the report (markdown).")
  d("string", "from_json", None, "Only render --output_md from this earlier JSON.")


def _other_folds() -> tuple[int, ...]:
  try:
    folds = tuple(int(k) for k in FLAGS.other_folds)
  except ValueError:
    raise app.UsageError(f"--other_folds={','.join(FLAGS.other_folds)}: whole numbers "
                         f"(e.g. 5,10)") from None
  for k in folds:
    common.int_flag_at_least("other_folds", k, 2)
  return folds


def config_from_flags() -> quality_score_lib.QualityScoreConfig:
  robust_val.check_condition_flags()
  common.int_flag_at_least("folds", FLAGS.folds, 2)
  common.int_flag_at_least("shape_components", FLAGS.shape_components, 1)
  common.finite_flag("ridge", FLAGS.ridge)
  if FLAGS.ridge < 0:
    raise app.UsageError(f"--ridge={FLAGS.ridge}: must be >= 0")
  return quality_score_lib.QualityScoreConfig(
      output_json=FLAGS.output_json, output_md=FLAGS.output_md, model=FLAGS.model,
      split=FLAGS.split, train_split=FLAGS.train_split, conditions=tuple(FLAGS.conditions),
      max_faces=FLAGS.max_faces, yaw_fraction=FLAGS.yaw_fraction,
      fail_nme=FLAGS.quality_fail_nme, min_flagged=FLAGS.min_flagged,
      max_false_alarms=FLAGS.max_false_alarms, folds=FLAGS.folds,
      other_folds=_other_folds(),
      shape_components=FLAGS.shape_components, ridge=FLAGS.ridge,
      features=tuple(FLAGS.features), features_cache=FLAGS.features_cache)


def main(argv):
  common.start(argv)
  if FLAGS.from_json:
    res = json.loads(pathlib.Path(FLAGS.from_json).read_text())
  else:
    if not FLAGS.output_json:
      raise app.UsageError("--output_json is required (or --from_json to render a report)")
    res = quality_score_lib.run(config_from_flags(), config_flags.data_config_from_flags(),
                                "python -m experiments.quality_score " + " ".join(sys.argv[1:]))
  if FLAGS.output_md:
    atomic_io.write_text(FLAGS.output_md, quality_score_lib.markdown_report(res))
    print(f"wrote {FLAGS.output_md}")


if __name__ == "__main__":
  define_flags()
  common.run(main)
