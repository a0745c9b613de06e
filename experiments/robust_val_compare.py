r"""Training recipes side by side on val + robust-val, from `experiments.robust_val` JSONs
(issue #28: "the chosen recipe better than today's in every condition"):

  python -m experiments.robust_val_compare \
      --runs=shipped:results/robust_val_default.json,base_10k:R/a.json,robust_10k:R/b.json \
      --output_md=results/recipe_10k_robust_val.md

The first run is the reference. Per condition: each run's inter-ocular NME (%) and FR@0.10,
and whether it is lower than the reference's; per run: in how many conditions it is better,
where it is worse, and its quality score (Tf recalibrated on val + robust-val, in how many
conditions it meets the target).
"""
from __future__ import annotations

import json
import pathlib
import sys

from absl import flags

from experiments import common
from experiments import robust_val_lib
from musica_jax import atomic_io

FLAGS = flags.FLAGS


def define_flags() -> None:
  d = common.define_flag
  d("list", "runs", None, "name:path of each model's robust_val JSON; the first is the "
    "reference.", required=True)
  d("string", "output_md", None, "Where to write the markdown table.")
  d("string", "output_json", None, "Where to write the comparison (JSON).")


def main(argv):
  common.start(argv)
  runs = common.name_path_flag("runs", FLAGS.runs)
  results = {}
  for name, path in runs:
    try:
      results[name] = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError) as e:
      raise common.UserError(f"--runs: {name}:{path}: {e}") from None
  table = robust_val_lib.compare(results)
  command = "python -m experiments.robust_val_compare " + " ".join(sys.argv[1:])
  text = robust_val_lib.compare_markdown(table) + f"\nCommand: `{command}`\n"
  print(text)
  if FLAGS.output_md:
    atomic_io.write_text(FLAGS.output_md, text)
  if FLAGS.output_json:
    common.write_json(FLAGS.output_json, {"command": command, **table})


if __name__ == "__main__":
  define_flags()
  common.run(main)
