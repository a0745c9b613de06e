"""A learned quitting signal: a small head on the cascade's own state after each iteration.

Why (issue "knowing when to quit that pays"): the paper quits a face when its estimated
CURRENT error E falls below Ts. On 300W even the true current error used that way captures
only about half of the oracle's gain: a face with a high error that the next iteration
does not improve is better stopped, and its compute given to a face that does improve.
The oracle's knowledge is the GAIN of the next iteration; this head learns an estimate of
it (or of the current error, for comparison) from what the cascade already computed.

Features of a face after iteration i (all gradient-stopped: the head never changes the
landmarks, so the full cascade's accuracy is exactly the base model's):
  hidden state h_i [H], the network's E_i, log(max(E_i, 1e-4)), and the length of the
  iteration's step: mean over landmarks of |S_i - S_{i-1}| / BOX_SIZE (crop pixels per
  box side, so the same number whatever the face size).
Head per iteration (parameters stacked on a leading stage axis like the cascade's):
  standardise -> dense(hidden_units) -> relu -> dense(1). The last stage's head is never
  used to quit (the cascade ends there anyway); it is trained like the others.

Kinds (what the head predicts; `score` is what the quitting rule compares, in both cases
"quit when score < threshold", and the budget path runs the next iteration on the faces of
HIGHEST score):
  "gain":  NME_i - NME_{i+1} (inter-ocular, as a fraction), the next iteration's gain.
  "error": log NME_i; score = exp(output), an estimate of the current error.
  "estimated_error": no head: the network's own E (the paper's rule). Stored as
    quit_head.json alone, for its validation profile (budget -> capacities / threshold).
A face's quality score (what users threshold with Tf) stays the network's own E.

This module: the score at inference and the head's files in a model directory. Fitting
the heads: `experiments/quit_head_fit.py`; a budget turned into capacities or thresholds:
`musica_jax.budget`.
"""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from musica_jax import atomic_io
from musica_jax import face_frame
from musica_jax import provenance
from musica_jax import strict_json

KINDS = ("gain", "error")
PARAMS_FILE = "quit_head.npz"
INFO_FILE = "quit_head.json"
FORMAT = "musica-jax-quit-head"
VERSION = 1
EPS = 1e-4


def features(hidden: jax.Array, error: jax.Array, step: jax.Array) -> jax.Array:
  """[..., H], [...], [...] -> [..., H + 3] (see the module docstring)."""
  e = error.astype(jnp.float32)[..., None]
  return jnp.concatenate([hidden.astype(jnp.float32), e, jnp.log(jnp.maximum(e, EPS)),
                          step.astype(jnp.float32)[..., None]], axis=-1)


def step_length(new_shape: jax.Array, old_shape: jax.Array) -> jax.Array:
  """Mean landmark displacement of one iteration, in box sides: [..., N, 2] x2 -> [...]."""
  return jnp.linalg.norm(new_shape - old_shape, axis=-1).mean(-1) / face_frame.BOX_SIZE


def apply_raw(params: dict, feats: jax.Array) -> jax.Array:
  """One stage's MLP: params of that stage (no stage axis; "mean", "std", "w1", "b1", "w2",
  "b2"), feats [..., D] -> output [...] before the exp of an "error" head."""
  x = (feats - params["mean"]) / params["std"]
  h = jax.nn.relu(x @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def apply(params: dict, feats: jax.Array) -> jax.Array:
  """One stage's head: params of that stage (no stage axis), feats [..., D] -> score [...]."""
  out = apply_raw(params, feats)
  return jnp.where(params["exp_output"] > 0, jnp.exp(jnp.minimum(out, 30.0)), out)


def score(params: dict | None, hidden, error, step) -> jax.Array:
  """The quitting score of one stage; None params = the network's own estimated error."""
  if params is None:
    return error
  return apply(params, jax.lax.stop_gradient(features(hidden, error, step)))


def stage_slice(params: dict | None, i: int):
  return None if params is None else jax.tree.map(lambda x: x[i], params)


# ------------------------------------------------------------------------------- storage

def file_names(schedule: str = "") -> tuple[str, str]:
  """(params file, info file) of the policy of the model's own schedule (""), or of
  another schedule of its weights ("@9_17_34": `musica_jax.schedules`)."""
  stem = "quit_head" + schedule
  return stem + ".npz", stem + ".json"


def save(directory, params: dict | None, info: dict, schedule: str = "") -> None:
  """Writes quit_head.json (+ quit_head.npz unless params is None: the policy is then the
  network's estimated error) into a model directory, each file atomically; `schedule`:
  the suffix of another schedule's files (`file_names`)."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  params_file, info_file = file_names(schedule)
  if params is None:
    (directory / params_file).unlink(missing_ok=True)
  else:
    atomic_io.write(directory / params_file, lambda fh: np.savez(
        fh, **{k: np.asarray(v, np.float32) for k, v in params.items()}), binary=True)
  doc = {"format": FORMAT, "version": VERSION, **provenance.portable(info)}
  atomic_io.write(directory / info_file, lambda fh: strict_json.dump(doc, fh, indent=1))


_KEYS = ("w1", "b1", "w2", "b2", "mean", "std", "exp_output")


def load(directory, num_stages: int, hidden_size: int,
         schedule: str = "") -> tuple[dict | None, dict] | None:
  """(params, info) of a model directory's quitting policy; None when it has none.

  params is None for the policy "the network's own estimated error" (info only: the
  validation profile that turns a budget into capacities or a threshold). `schedule`:
  another schedule's policy (`file_names`).
  """
  directory = pathlib.Path(directory)
  params_name, info_name = file_names(schedule)
  info_path = directory / info_name
  if not info_path.is_file():
    if (directory / params_name).is_file():
      raise ValueError(f"{directory}: {params_name} without {info_name}")
    return None
  try:
    info = json.loads(info_path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{info_path}: not valid JSON: {e}") from e
  if info.get("format") != FORMAT:
    raise ValueError(f"{info_path}: not a {FORMAT} file")
  for key in ("profile", "thresholds"):
    if not info.get(key):
      raise ValueError(f"{info_path}: no {key!r} table")
  if info.get("kind") == "estimated_error":
    return None, info
  with np.load(directory / params_name) as z:
    params = {k: np.asarray(z[k], np.float32) for k in z.files}
  missing = set(_KEYS) - set(params)
  if missing:
    raise ValueError(f"{directory / params_name}: missing arrays {sorted(missing)}")
  d = hidden_size + 3
  if params["w1"].shape[:2] != (num_stages, d):
    raise ValueError(f"{directory / params_name}: w1 has shape {params['w1'].shape}, the "
                     f"model needs [{num_stages}, {d}, units]")
  return params, info
