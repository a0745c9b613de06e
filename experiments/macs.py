"""Model cost table (paper Table 1): multiply-adds and parameters of every variant.

  python -m experiments.macs --output_json=macs.json
"""
from __future__ import annotations

import pathlib

from absl import app
from absl import flags

from musica_jax import config as config_lib
from musica_jax import cost
from musica_jax import strict_json

_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Where to write the JSON table.")

VARIANTS = (("ibug68", 68), ("ibug68", 34), ("ibug68", 19),
            ("wflw98", 98), ("wflw98", 49), ("wflw98", 44))
PAPER_MMACS = {"68/68": 95, "68/34": 48, "68/19": 26, "98/98": 138, "98/49": 69}


def table() -> dict:
  rows = {}
  for scheme, patches in VARIANTS:
    cfg = config_lib.for_scheme(scheme, patches)
    name = f"{cfg.num_landmarks}/{patches}"
    rows[name] = {
        "landmarks": cfg.num_landmarks, "patches": patches, "iterations": cfg.num_stages,
        "mmacs": round(cost.cascade_macs(cfg) / 1e6, 3),
        "mmacs_per_iteration": round(cost.cascade_macs(cfg, 1) / 1e6, 3),
        "mparams": round(cost.parameter_count(cfg) / 1e6, 3),
        "paper_mmacs": PAPER_MMACS.get(name),
    }
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  rows = table()
  print(f"{'variant':>8} {'MMACs':>8} {'paper':>6} {'Mparams':>8}")
  for name, r in rows.items():
    print(f"{name:>8} {r['mmacs']:8.1f} {str(r['paper_mmacs'] or '-'):>6} {r['mparams']:8.2f}")
  if _OUTPUT_JSON.value:
    path = pathlib.Path(_OUTPUT_JSON.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(strict_json.dumps(rows, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
