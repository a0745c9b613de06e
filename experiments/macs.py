"""Model cost table (paper Table 1): multiply-adds, parameters and weight memory of every
variant, then the Table 4 ablation variants, the phone model (section 4.3) and factored
recurrent layers (`recurrent_rank`).

  python -m experiments.macs --output_json=macs.json

Memory: the weights in MB (1e6 bytes) as float32 and as shipped (the parameter dtype of
the package's default model, `musica_jax/default_model/model.json`: bfloat16).
"""
from __future__ import annotations

import json

from absl import app
from absl import flags

from experiments import common
from musica_jax import config as config_lib
from musica_jax import cost
from musica_jax import model_io

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flag (defined only when run as a program)."""
  common.define_flag("string", "output_json", None, "Where to write the JSON table.")

VARIANTS = (("ibug68", 68), ("ibug68", 34), ("ibug68", 19),
            ("wflw98", 98), ("wflw98", 49), ("wflw98", 44))
PAPER_MMACS = {"68/68": 95, "68/34": 48, "68/19": 26, "98/98": 138, "98/49": 69}
PAPER_MEMORY_MB = {"68/68": 9.10, "68/34": 4.60, "68/19": 2.64, "98/98": 13.02, "98/49": 5.94}
# Name, patches, ModelConfig overrides: the ablation rows of experiments.ablation and the
# phone model of experiments/configs/300w_mobile.flags, on 68 points.
OTHER_VARIANTS = (
    ("68/19 no local attention", 19, dict(use_attention=False)),
    ("68/19 inverted bottleneck", 19, dict(extractor="inverted_bottleneck")),
    ("68/19 global FC", 19, dict(global_attention="fc")),
    ("68/19 global GCN", 19, dict(global_attention="gcn")),
    ("68/68 inverted bottleneck", 68, dict(extractor="inverted_bottleneck")),
    ("68/68 global FC", 68, dict(global_attention="fc")),
    ("68/68 global GCN", 68, dict(global_attention="gcn")),
    ("68/23 phone (2 it., no local attention)", 23, dict(levels=(1, 0), use_attention=False)),
    # The factored recurrent layer (ModelConfig.recurrent_rank; fine-tuned from a dense
    # model with experiments.train --init_from).
    ("68/34 recurrent rank 128", 34, dict(recurrent_rank=128)),
    ("68/34 recurrent rank 64", 34, dict(recurrent_rank=64)),
    ("68/68 recurrent rank 128", 68, dict(recurrent_rank=128)),
)


def shipped_dtype() -> str:
  """The parameter dtype of the package's default model (bfloat16), float32 without one."""
  try:
    path = model_io.default_model_path() / model_io.CONFIG_FILE
  except model_io.NoDefaultModelError:
    return "float32"
  return json.loads(path.read_text())["param_dtype"]


def _row(cfg: config_lib.ModelConfig, patches: int, dtype: str) -> dict:
  return {
      "landmarks": cfg.num_landmarks, "patches": patches, "iterations": cfg.num_stages,
      "use_attention": cfg.use_attention, "extractor": cfg.extractor,
      "global_attention": cfg.global_attention, "recurrent_rank": cfg.recurrent_rank,
      "mmacs": round(cost.cascade_macs(cfg) / 1e6, 3),
      "mmacs_per_iteration": round(cost.cascade_macs(cfg, 1) / 1e6, 3),
      "mparams": round(cost.parameter_count(cfg) / 1e6, 3),
      "memory_mb_float32": round(cost.weight_megabytes(cfg, "float32"), 2),
      "shipped_dtype": dtype,
      "memory_mb_shipped": round(cost.weight_megabytes(cfg, dtype), 2),
  }


def table() -> dict:
  dtype = shipped_dtype()
  rows = {}
  for scheme, patches in VARIANTS:
    cfg = config_lib.for_scheme(scheme, patches)
    name = f"{cfg.num_landmarks}/{patches}"
    rows[name] = {**_row(cfg, patches, dtype), "paper_mmacs": PAPER_MMACS.get(name),
                  "paper_memory_mb": PAPER_MEMORY_MB.get(name)}
  for name, patches, overrides in OTHER_VARIANTS:
    rows[name] = _row(config_lib.for_scheme("ibug68", patches, **overrides), patches, dtype)
  return rows


def print_table(rows: dict) -> None:
  dtype = next(iter(rows.values()))["shipped_dtype"]
  print(f"{'variant':>40} {'MMACs':>8} {'paper':>6} {'Mparams':>8} {'MB f32':>7} "
        f"{'MB ' + dtype:>12} {'paper MB':>8}")
  for name, r in rows.items():
    print(f"{name:>40} {r['mmacs']:8.1f} {str(r.get('paper_mmacs') or '-'):>6} "
          f"{r['mparams']:8.2f} {r['memory_mb_float32']:7.1f} {r['memory_mb_shipped']:12.1f} "
          f"{str(r.get('paper_memory_mb') or '-'):>8}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  rows = table()
  print_table(rows)
  if FLAGS.output_json:
    common.write_json(FLAGS.output_json, rows)


if __name__ == "__main__":
  define_flags()
  common.run(main)
