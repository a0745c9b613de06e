"""THE run config of a training workdir: `<workdir>/run_config.json`.

Written by training (experiments.train) when a run starts or resumes; read by everything
that loads a checkpoint (`model_io.restore`), by the analyses and by a resumed run. One
JSON object, one section per config:

    {"model": ModelConfig fields, "data": DataConfig fields, "train": TrainConfig fields,
     "mean_shape": [[x, y], ...] (crop pixels, the cascade's initial shape),
     ...any extra sections (a dict or a dataclass each)}

Reading is backward compatible: a `train` section written before a TrainConfig field
existed (e.g. `lr_schedule`) gets that field's default, and a field this code does not
know (written by a newer version) is ignored. An unknown *model* field is refused: it
would change the network. No TensorFlow, no absl.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from musica_jax import atomic_io
from musica_jax import strict_json
from musica_jax import training
from musica_jax.config import ModelConfig

RUN_CONFIG = "run_config.json"


def path(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / RUN_CONFIG


def _section(value):
  return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else dict(value)


def save(workdir, model_cfg: ModelConfig, data_cfg, train_cfg, mean_shape,
         **extra_sections) -> pathlib.Path:
  """Writes (atomically) the run config of `workdir`; each extra section is a dataclass
  or a dict."""
  body = {"model": _section(model_cfg), "data": _section(data_cfg),
          "train": _section(train_cfg),
          "mean_shape": np.asarray(mean_shape, np.float64).tolist()}
  clash = set(body) & set(extra_sections)
  if clash:
    raise ValueError(f"run config: extra sections {sorted(clash)} clash with the fixed ones")
  body.update({k: _section(v) for k, v in extra_sections.items()})
  return atomic_io.write_text(path(workdir), strict_json.dumps(body, indent=1))


def load(workdir) -> dict:
  """The run config of `workdir` as a dict: the JSON sections as written ("model",
  "data", "train", extras) plus "model_config" (a ModelConfig), "train_config" (a
  training.TrainConfig: missing fields take their defaults, unknown ones are dropped) and
  "mean_shape" as float32 [N, 2]. FileNotFoundError when the workdir has none;
  ValueError (naming the file) when it cannot be read."""
  p = path(workdir)
  if not p.is_file():
    raise FileNotFoundError(f"no {RUN_CONFIG} in {workdir}; is this a training workdir?")
  try:
    raw = json.loads(p.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{p}: not valid JSON: {e}") from e
  for key in ("model", "train", "mean_shape"):
    if key not in raw:
      raise ValueError(f"{p}: no {key!r} section")
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(raw["model"]) - known)
  if unknown:
    raise ValueError(f"{p}: model fields {unknown} are unknown to this code (written by a "
                     f"newer musica_jax?)")
  train_known = {f.name for f in dataclasses.fields(training.TrainConfig)}
  raw["model_config"] = ModelConfig(**raw["model"])
  raw["train_config"] = training.TrainConfig(
      **{k: v for k, v in raw["train"].items() if k in train_known})
  raw["mean_shape"] = np.asarray(raw["mean_shape"], np.float32)
  return raw
