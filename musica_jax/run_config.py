"""THE run config of a training workdir: `<workdir>/run_config.json`.

Written by training (experiments.train) when a run starts or resumes; read by everything
that loads a checkpoint (`restore.restore`), by the analyses and by a resumed run. One
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
from musica_jax.config import ModelConfig, TrainConfig

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
  TrainConfig: missing fields take their defaults, unknown ones are dropped) and
  "mean_shape" as float32 [N, 2]. FileNotFoundError when the workdir has none;
  ValueError (naming the file) when it cannot be read or does not hold a run config: not
  JSON, a section missing or of the wrong type, a model or training field the configs
  refuse, a mean shape that is not [N, 2] finite numbers for the model's N landmarks."""
  p = path(workdir)
  if not p.is_file():
    raise FileNotFoundError(f"no {RUN_CONFIG} in {workdir}; is this a training workdir?")
  try:
    raw = json.loads(p.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{p}: not valid JSON: {e}") from e
  except UnicodeDecodeError as e:
    raise ValueError(f"{p}: not a text file ({e})") from e
  if not isinstance(raw, dict):
    raise ValueError(f"{p}: a JSON object expected, found {type(raw).__name__}")
  for key in ("model", "train", "mean_shape"):
    if key not in raw:
      raise ValueError(f"{p}: no {key!r} section")
  for key in ("model", "train"):
    if not isinstance(raw[key], dict):
      raise ValueError(f"{p}: section {key!r} must be a JSON object, found "
                       f"{type(raw[key]).__name__}")
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(raw["model"]) - known)
  if unknown:
    raise ValueError(f"{p}: model fields {unknown} are unknown to this code (written by a "
                     f"newer musica_jax?)")
  train_known = {f.name for f in dataclasses.fields(TrainConfig)}
  try:
    raw["model_config"] = ModelConfig(**raw["model"])
  except (TypeError, ValueError) as e:     # a field of the wrong type or out of range
    raise ValueError(f"{p}: section 'model' does not make a model config: {e}") from e
  try:
    raw["train_config"] = TrainConfig(
        **{k: v for k, v in raw["train"].items() if k in train_known})
  except (TypeError, ValueError) as e:
    raise ValueError(f"{p}: section 'train' does not make a training config: {e}") from e
  n = raw["model_config"].num_landmarks
  try:
    mean_shape = np.asarray(raw["mean_shape"], np.float32)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{p}: mean_shape is not a list of [x, y] numbers: {e}") from e
  if mean_shape.shape != (n, 2):
    raise ValueError(f"{p}: mean_shape has shape {list(mean_shape.shape)}, the model has "
                     f"{n} landmarks: [{n}, 2] expected (a cut or edited file?)")
  if not np.all(np.isfinite(mean_shape)):
    raise ValueError(f"{p}: mean_shape has non-finite values")
  raw["mean_shape"] = mean_shape
  return raw
