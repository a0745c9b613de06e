"""A compact, self-contained exported model: one directory, two files.

    <dir>/model.json   format tag and version, ModelConfig, mean shape [N, 2] (crop
                       pixels), parameter dtype, per-array shapes, a SHA-256 of the
                       parameter file, free-form metadata (training run, evaluation),
                       optionally the default failure threshold `default_t_fail` (chosen on a
                       validation split, `experiments.choose_t_fail`), and `model_sha256`: a
                       SHA-256 of all the other fields (the parameter checksum included),
                       so an edit anywhere in the model (e.g. `levels`) is refused.
    <dir>/params.npz   the stacked stage parameters, one array per leaf, keyed by its path
                       ("conv1/kernel", ...). bfloat16 storage keeps the raw 16-bit words
                       (uint16) because .npz has no bfloat16; `load_model` turns them back
                       into float32.

Optional, beside them: quit_head.npz + quit_head.json, a learned quitting signal
(`musica_jax.quit_head`, written by `experiments.fit_quit_head`).

No TensorFlow, no orbax: numpy + JAX only. `load_model` checks every array against the
shapes a fresh `stage_net.init_stacked` would make for the stored config, so a file that
does not match its config is refused with a message naming the array.

THE way to load a model (every entry point, the predictor and the tests use it):
`load(source, step)`: an exported directory (`load_model`), 'default' or 'musica68' (the
shipped models, `BUNDLED_MODELS`) or a training workdir (`musica_jax.restore`: the EMA
weights of a checkpoint, "latest", "best" or a step number; orbax and optax are imported
only then). Both give a
`LoadedModel` (float32 numpy parameters on the host; replicate them over devices with
`parallel.replicate`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import pathlib
from typing import Any

import jax
import ml_dtypes
import numpy as np

from musica_jax import atomic_io
from musica_jax import provenance
from musica_jax import quit_head
from musica_jax import run_config
from musica_jax import stage_net
from musica_jax import strict_json
from musica_jax.config import ModelConfig

FORMAT = "musica-jax-model"
VERSION = 1
CONFIG_FILE = "model.json"
PARAMS_FILE = "params.npz"
DTYPES = ("float32", "bfloat16")
DEFAULT_MODEL_DIR = pathlib.Path(__file__).resolve().parent / "default_model"
# The models `load` accepts by name, each in musica_jax/<name>_model/: the default (the
# fast one, whose dial and speed the docs measure; tracked) and MuSiCa68 (twice its
# multiply-adds, more accurate; git-ignored and built locally: results/recipe_10k_robust_val.md).
BUNDLED_MODELS = ("default", "musica68")


@dataclasses.dataclass
class LoadedModel:
  """A model from an exported directory or from a training workdir's checkpoint."""
  params: Any                 # stacked stage parameters (float32 numpy arrays)
  model_config: ModelConfig
  mean_shape: np.ndarray      # float32 [N, 2], crop pixels: the cascade's initial shape
  # Exported: model.json's metadata (name, "source": the training run, "evaluation").
  # Workdir: the provenance: workdir, checkpoint_step, data, train,
  # skipped_damaged_checkpoints (when "latest" walked back), chosen_on (step "best").
  metadata: dict
  dtype: str                  # storage dtype of the parameters (a checkpoint: float32)
  path: str                   # the model directory or the workdir, as given
  quit_head: Any = None       # stacked quit-head parameters (musica_jax.quit_head) or None
  quit_info: dict | None = None   # its quit_head.json (kind, calibration profile, ...)
  default_t_fail: float | None = None  # failure threshold chosen on validation (None: none)
  from_workdir: bool = False  # True: restored from a training checkpoint


class NoDefaultModelError(FileNotFoundError):
  pass


class StepError(ValueError):
  """A checkpoint step that is not a number, 'latest' or 'best', or 'best' without any
  evaluation logged for a kept checkpoint."""


def default_model_path(name: str = "default") -> pathlib.Path:
  """The directory of a model shipped in the package (`BUNDLED_MODELS`);
  NoDefaultModelError when it is absent."""
  path = DEFAULT_MODEL_DIR if name == "default" else DEFAULT_MODEL_DIR.parent / f"{name}_model"
  if not is_model_dir(path):
    raise NoDefaultModelError(
        f"no {name} model ships with this installation: {path} "
        f"({CONFIG_FILE} + {PARAMS_FILE}) does not exist. Give a model "
        f"explicitly (a training workdir, or a directory written by "
        f"`python -m experiments.export_model --workdir=W --output=DIR`).")
  return path


def _key(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def param_template(model_config: ModelConfig):
  """Abstract (shape/dtype) parameter tree of a model with this config."""
  return jax.eval_shape(functools.partial(stage_net.init_stacked, config=model_config),
                        jax.random.key(0))


def flatten_params(params) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {_key(p): np.asarray(jax.device_get(v)) for p, v in leaves}


def check_params(params, model_config: ModelConfig, where: str = "params") -> None:
  """ValueError naming the array when `params` (a stacked parameter tree) does not hold
  exactly the arrays, names and shapes, of a model with `model_config`."""
  expected = {_key(p): tuple(v.shape)
              for p, v in jax.tree_util.tree_flatten_with_path(param_template(model_config))[0]}
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  _check_arrays({_key(p): tuple(np.shape(v)) for p, v in leaves}, expected, where)


def _sha256(path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def params_digest(directory) -> str:
  """The SHA-256 of a model directory's params.npz as model.json records it (`load_model`
  checks the file against it); hashed when a model.json has none."""
  d = pathlib.Path(directory)
  try:
    recorded = json.loads((d / CONFIG_FILE).read_text()).get("params_sha256")
  except (OSError, ValueError):
    recorded = None
  return recorded or _sha256(d / PARAMS_FILE)


def _jsonable(x):
  """Metadata values -> plain JSON (numpy scalars/arrays, tuples, paths)."""
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, pathlib.PurePath):
    return str(x)
  return x


def _model_digest(info: dict) -> str:
  """SHA-256 of model.json's content without its own checksum field (canonical JSON)."""
  body = {k: v for k, v in json.loads(strict_json.dumps(info)).items() if k != "model_sha256"}
  return hashlib.sha256(strict_json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write_model_json(out: pathlib.Path, info: dict) -> None:
  """model.json with portable provenance (`musica_jax.provenance`: no absolute paths of
  the machine that wrote it) and its checksum."""
  told = {k: info[k] for k in ("metadata", "default_t_fail_chosen") if k in info}
  info = {**info, **provenance.portable(told)}
  info = {**info, "model_sha256": _model_digest(info)}
  atomic_io.write(out / CONFIG_FILE, lambda f: strict_json.dump(info, f, indent=1))


def set_default_t_fail(path, t_fail: float, how: dict) -> None:
  """Records the model's default failure threshold (and how it was chosen) in model.json,
  re-stamping its checksum. The model is loaded (and so verified) first."""
  if not (np.isfinite(t_fail) and t_fail > 0):
    raise ValueError(f"default Tf must be a positive number, got {t_fail}")
  load_model(path)
  out = pathlib.Path(path)
  info = json.loads((out / CONFIG_FILE).read_text())
  info.update(default_t_fail=float(t_fail), default_t_fail_chosen=_jsonable(how))
  _write_model_json(out, info)


def save_model(path, params, model_config: ModelConfig, mean_shape, metadata: dict | None = None,
               dtype: str = "float32") -> pathlib.Path:
  """Writes the model directory `path` (created; existing model files are replaced).

  params: the stacked stage parameters (e.g. the EMA parameters of a checkpoint).
  mean_shape: [N, 2] initial shape in crop pixels.
  dtype: "float32" or "bfloat16" (half the size; check the NME before shipping it).
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
  if not isinstance(model_config, ModelConfig):
    raise TypeError(f"model_config must be a ModelConfig, got {type(model_config).__name__}")
  mean_shape = np.asarray(mean_shape, np.float32)
  if mean_shape.shape != (model_config.num_landmarks, 2) or not np.all(np.isfinite(mean_shape)):
    raise ValueError(f"mean_shape must be finite [{model_config.num_landmarks}, 2], got "
                     f"{mean_shape.shape}")
  flat = flatten_params(params)
  expected = {_key(p): tuple(v.shape)
              for p, v in jax.tree_util.tree_flatten_with_path(param_template(model_config))[0]}
  _check_arrays({k: v.shape for k, v in flat.items()}, expected, "params")
  stored, shapes = {}, {}
  for k, v in flat.items():
    if not np.all(np.isfinite(v)):
      raise ValueError(f"params: {k} has non-finite values; refusing to export")
    v32 = v.astype(np.float32)
    shapes[k] = list(v32.shape)
    stored[k] = v32.astype(ml_dtypes.bfloat16).view(np.uint16) if dtype == "bfloat16" else v32

  out = pathlib.Path(path)
  out.mkdir(parents=True, exist_ok=True)
  digest = _sha256(atomic_io.write(out / PARAMS_FILE, lambda f: np.savez(f, **stored),
                                   binary=True))
  info = {
      "format": FORMAT, "version": VERSION,
      "model_config": dataclasses.asdict(model_config),
      "mean_shape": mean_shape.astype(np.float64).tolist(),
      "param_dtype": dtype, "param_shapes": shapes,
      "params_sha256": digest,
      "num_parameters": int(sum(int(np.prod(s)) for s in shapes.values())),
      "metadata": _jsonable(metadata or {}),
  }
  _write_model_json(out, info)
  return out


def _check_arrays(got: dict, expected: dict, where: str) -> None:
  missing = sorted(set(expected) - set(got))
  extra = sorted(set(got) - set(expected))
  if missing or extra:
    raise ValueError(f"{where}: parameter names do not match the model config "
                     f"(missing {missing}, unexpected {extra})")
  for k, shape in expected.items():
    if tuple(got[k]) != tuple(shape):
      raise ValueError(f"{where}: {k} has shape {tuple(got[k])}, the config needs {tuple(shape)}")


def is_model_dir(path) -> bool:
  p = pathlib.Path(path)
  return (p / CONFIG_FILE).is_file() and (p / PARAMS_FILE).is_file()


def load_model(path, verify: bool = True) -> LoadedModel:
  """Reads a directory written by `save_model`. Parameters come back as float32 numpy.

  verify: check the SHA-256 of params.npz against model.json (a truncated or swapped
  file is refused).
  """
  p = pathlib.Path(path)
  if not p.is_dir():
    raise FileNotFoundError(f"model {path}: not a directory (expected {CONFIG_FILE} + "
                            f"{PARAMS_FILE}, written by experiments.export_model)")
  for f in (CONFIG_FILE, PARAMS_FILE):
    if not (p / f).is_file():
      raise FileNotFoundError(f"model {path}: missing {f} (written by experiments.export_model)")
  try:
    info = json.loads((p / CONFIG_FILE).read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"model {path}: {CONFIG_FILE} is not valid JSON: {e}") from e
  if info.get("format") != FORMAT:
    raise ValueError(f"model {path}: {CONFIG_FILE} is not a {FORMAT} file")
  if int(info.get("version", -1)) > VERSION:
    raise ValueError(f"model {path}: format version {info['version']} is newer than this "
                     f"code reads ({VERSION}); update musica_jax")
  dtype = info.get("param_dtype")
  if dtype not in DTYPES:
    raise ValueError(f"model {path}: unknown param_dtype {dtype!r}")
  if verify and info.get("model_sha256") and _model_digest(info) != info["model_sha256"]:
    raise ValueError(f"model {path}: {CONFIG_FILE} does not match its checksum "
                     f"(model_sha256): edited after export?")
  if verify and info.get("params_sha256") and _sha256(p / PARAMS_FILE) != info["params_sha256"]:
    raise ValueError(f"model {path}: {PARAMS_FILE} does not match the checksum in "
                     f"{CONFIG_FILE} (truncated or replaced file?)")
  cfg = ModelConfig(**info["model_config"])
  mean_shape = np.asarray(info["mean_shape"], np.float32)
  if mean_shape.shape != (cfg.num_landmarks, 2):
    raise ValueError(f"model {path}: mean_shape is {mean_shape.shape}, config has "
                     f"{cfg.num_landmarks} landmarks")
  template = param_template(cfg)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  with np.load(p / PARAMS_FILE, allow_pickle=False) as z:
    raw = {k: z[k] for k in z.files}
  _check_arrays({k: v.shape for k, v in raw.items()},
                {_key(q): leaf.shape for q, leaf in leaves}, f"model {path}")
  arrays = []
  for q, _ in leaves:
    v = raw[_key(q)]
    if dtype == "bfloat16":
      if v.dtype != np.uint16:
        raise ValueError(f"model {path}: {_key(q)} should hold bfloat16 words (uint16), "
                         f"found {v.dtype}")
      v = v.view(ml_dtypes.bfloat16)
    arrays.append(np.asarray(v, np.float32))
  params = jax.tree_util.tree_unflatten(treedef, arrays)
  head, head_info = read_quit_head(p, cfg, f"model {path}")
  return LoadedModel(params=params, model_config=cfg, mean_shape=mean_shape,
                     metadata=info.get("metadata", {}), dtype=dtype, path=str(p),
                     # "default_tf": the key's name in models exported before the rename
                     default_t_fail=info.get("default_t_fail", info.get("default_tf")),
                     quit_head=head, quit_info=head_info)


def read_quit_head(directory, cfg: ModelConfig, where: str):
  """(parameters, info) of the quitting policy stored in `directory`, (None, None) when
  there is none; a ValueError naming `where` when it cannot be read."""
  try:
    head = quit_head.load(directory, cfg.num_stages, cfg.hidden_size)
  except (ValueError, KeyError, OSError) as e:
    raise ValueError(f"{where}: quit head: {e}") from e
  return (None, None) if head is None else head


def load(source, step="latest", on_skip=None) -> LoadedModel:
  """A model from whatever `source` holds: 'default' or 'musica68' (the package's
  models, `BUNDLED_MODELS`), an exported model directory (`load_model`; `step` must
  stay "latest") or a training workdir (`restore(source, step, on_skip)`)."""
  if str(source) in BUNDLED_MODELS:
    source = default_model_path(str(source))
  p = pathlib.Path(source)
  if run_config.path(p).is_file() and not (p / CONFIG_FILE).is_file():
    from musica_jax import restore  # noqa: PLC0415  (orbax and optax: only for workdirs)
    return restore.restore(p, step, on_skip)
  if step != "latest" and is_model_dir(p):
    raise StepError(f"checkpoint step {step!r}: {source} is an exported model (one set "
                    f"of weights), not a training workdir")
  return load_model(p)      # also the errors of a path that holds neither
