"""Shared pieces of the absl entry points: flagfile lookup, model flags, run config files.

Flagfiles live in `experiments/configs/`. absl reads `--flagfile=PATH` relative to the
working directory; when PATH does not exist there, the entry points look it up in
`experiments/configs/`, so `python -m experiments.train --flagfile=wflw98.flags` works
from the repository root (and anywhere else). Flags given after the flagfile override it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile

from absl import app
from absl import flags
from absl import logging
import numpy as np

from musica_jax import config as config_lib
from musica_jax import schemes

CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "configs"

FLAGS = flags.FLAGS

flags.DEFINE_integer("num_patches", 0, "Patches per iteration (0 = one per landmark). "
                     "Built-in subsets: 68/34/23/19 (68 points), 98/49/44 (98 points).")
flags.DEFINE_list("levels", ["2", "1", "0"], "Pyramid level read by each iteration.")
flags.DEFINE_boolean("use_attention", True, "Local patch attention (paper 3.1).")
flags.DEFINE_enum("extractor", "conv", list(config_lib.EXTRACTORS),
                  "Per-patch feature extractor: two 3x3 convs (the paper's) or MobileNetV2 "
                  "inverted bottlenecks (paper Table 4 ablation).")
flags.DEFINE_enum("global_attention", "none", list(config_lib.GLOBAL_ATTENTIONS),
                  "Global patch attention over all patches of a face: none, fc or gcn "
                  "(k-nearest-patch graph; paper Table 4 ablation).")
flags.DEFINE_integer("hidden_size", 512, "Recurrent state size.")

# Training flags: defined here so every entry point accepts the same flagfiles.
flags.DEFINE_string("workdir", None, "Checkpoints, logs and metrics of the run.")
flags.DEFINE_integer("steps", 30000, "Total training steps.")
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
flags.DEFINE_integer("decay_steps", 15000, "Learning rate x decay_factor every this many steps.")
flags.DEFINE_float("decay_factor", 0.1, "Staircase learning-rate decay factor.")
flags.DEFINE_float("ema_decay", 0.9999, "EMA of the weights used for evaluation.")
flags.DEFINE_integer("log_every", 50, "Steps between progress lines.")
flags.DEFINE_integer("eval_every", 1000, "Steps between evaluations on --eval_split "
                     "(0: only at the end; -1: never).")
flags.DEFINE_integer("checkpoint_every", 500, "Steps between checkpoints.")
flags.DEFINE_integer("keep_checkpoints", 3, "Latest checkpoints kept (plus the best by eval NME).")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-host: host:port of process 0; with --num_processes and --process_id "
                    "calls jax.distributed.initialize.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def start(argv) -> None:
  """First lines of every entry point's main: no stray arguments, quiet libraries."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_libraries()


def write_json(path, data, indent: int = 2) -> None:
  """Writes `data` as JSON atomically and says so."""
  atomic_write_text(path, json.dumps(data, indent=indent))
  print(f"wrote {path}")


def quiet_libraries() -> None:
  """Orbax and TF log every checkpoint step at INFO; keep the console for progress lines
  unless the user asked for more with --verbosity."""
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def resolve_flagfiles(argv: list[str]) -> list[str]:
  """Rewrites --flagfile=NAME to experiments/configs/NAME when NAME is not a path here."""
  out = []
  for arg in argv:
    for prefix in ("--flagfile=", "-flagfile="):
      if arg.startswith(prefix):
        name = arg[len(prefix):]
        if not os.path.exists(name):
          candidate = CONFIG_DIR / name
          if not candidate.exists() and not name.endswith(".flags"):
            candidate = CONFIG_DIR / f"{name}.flags"
          if not candidate.exists():
            known = sorted(p.name for p in CONFIG_DIR.glob("*.flags"))
            raise SystemExit(f"--flagfile={name}: no such file here or in {CONFIG_DIR} "
                             f"(known: {', '.join(known)})")
          arg = prefix + str(candidate)
    out.append(arg)
  return out


def model_config_from_flags(num_points: int) -> config_lib.ModelConfig:
  scheme = schemes.get_scheme(num_points)
  try:
    levels = tuple(int(l) for l in FLAGS.levels)
  except ValueError as e:
    raise ValueError(f"--levels: comma-separated integers expected, got {FLAGS.levels}") from e
  try:
    return config_lib.for_scheme(scheme, FLAGS.num_patches or None, levels=levels,
                                 use_attention=FLAGS.use_attention,
                                 extractor=FLAGS.extractor,
                                 global_attention=FLAGS.global_attention,
                                 hidden_size=FLAGS.hidden_size)
  except ValueError as e:
    raise ValueError(f"--num_patches/--levels: {e}") from e


def atomic_write_text(path, text: str) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.replace(tmp, path)


RUN_CONFIG = "run_config.json"


def save_run_config(workdir, model_cfg, data_cfg, train_cfg, mean_shape) -> None:
  atomic_write_text(pathlib.Path(workdir) / RUN_CONFIG, json.dumps({
      "model": dataclasses.asdict(model_cfg),
      "data": dataclasses.asdict(data_cfg),
      "train": dataclasses.asdict(train_cfg),
      "mean_shape": np.asarray(mean_shape, np.float64).tolist(),
  }, indent=1))


def load_run_config(workdir) -> dict:
  """(model config, raw dict) of a training run's workdir."""
  path = pathlib.Path(workdir) / RUN_CONFIG
  if not path.exists():
    raise FileNotFoundError(f"--workdir={workdir}: no {RUN_CONFIG}; is this a training workdir?")
  raw = json.loads(path.read_text())
  raw["model_config"] = config_lib.ModelConfig(**raw["model"])
  raw["mean_shape"] = np.asarray(raw["mean_shape"], np.float32)
  return raw
