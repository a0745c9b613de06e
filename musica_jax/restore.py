"""A training workdir's checkpoint as a model: the orbax restore (`musica_jax.checkpoints`)
of the training state, its EMA weights as a `model_io.LoadedModel`, and the choice of the
"best" step from training's evaluations. Imports orbax and optax (training's state), which
inference from an exported model directory never needs: `model_io.load` imports this
module only for a workdir.
"""
from __future__ import annotations

import functools
import json
import pathlib

import jax
import numpy as np

from musica_jax import checkpoints
from musica_jax import model_io
from musica_jax import run_config
from musica_jax import training
from musica_jax.model_io import LoadedModel, StepError

METRICS_LOG = "metrics.jsonl"       # training's log: "best" reads its evaluations
BEST_METRIC = "eval/nme_interocular"


def best_step(workdir, steps) -> int:
  """The step among `steps` with the lowest inter-ocular NME of training's evaluations in
  `<workdir>/metrics.jsonl` (on the split training evaluated on, run_config's
  data.eval_split: `val` for the 300W flagfiles); ties go to the earlier step. Lines that
  are not JSON (a run killed mid-write) are passed over. StepError when no step in
  `steps` has an evaluation."""
  log = pathlib.Path(workdir) / METRICS_LOG
  nme = {}
  if log.is_file():
    for line in log.read_text().splitlines():
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(rec, dict) and BEST_METRIC in rec and "step" in rec:
        nme[int(rec["step"])] = float(rec[BEST_METRIC])
  scored = [s for s in steps if s in nme and np.isfinite(nme[s])]
  if not scored:
    raise StepError(f"no checkpoint of {workdir} has an evaluation in {log}")
  return min(scored, key=lambda s: (nme[s], s))


def _step_number(step) -> int | str:
  """'latest' | 'best' | a step number (int or digit string)."""
  if step in ("latest", "best"):
    return step
  if isinstance(step, (int, np.integer)) and not isinstance(step, bool) and step >= 0:
    return int(step)
  if isinstance(step, str) and step.isdigit():
    return int(step)
  raise StepError(f"checkpoint step {step!r}: a step number, 'latest' or 'best'")


def restore_state(workdir, step="latest", on_skip=None):
  """(the whole training state of a checkpoint, on this process's first device; the run
  config (`run_config.load`); the damaged checkpoints skipped, [{"step", "reason"}]).
  `step` and the errors as in `restore`, which is what evaluation wants: this one is for
  looking at the raw weights or the optimiser state."""
  wanted = _step_number(step)
  run = run_config.load(workdir)
  if not (pathlib.Path(workdir) / "checkpoints").is_dir():
    raise FileNotFoundError(f"no checkpoints/ folder in {workdir}")
  abstract = jax.eval_shape(functools.partial(training.create_train_state,
                                              run["model_config"], run["train_config"]))
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev),
                          abstract)
  skipped = []

  def skip(s, why):
    skipped.append({"step": int(s), "reason": why})
    if on_skip is not None:
      on_skip(s, why)

  ckpts = checkpoints.Checkpoints(str(workdir), async_save=False)
  try:
    number = best_step(workdir, ckpts.all_steps()) if wanted == "best" else (
        None if wanted == "latest" else wanted)
    state = ckpts.restore(abstract, number, on_skip=skip)
  finally:
    ckpts.close()
  return state, run, skipped


def restore(workdir, step="latest", on_skip=None) -> LoadedModel:
  """The EMA parameters of a training workdir's checkpoint, as a LoadedModel.

  step: "latest" (the newest checkpoint that restores intact: damaged newer ones are
  reported as on_skip(step, reason) and listed in metadata["skipped_damaged_checkpoints"]),
  "best" (`best_step`; metadata["chosen_on"] names the split it was chosen on), or a
  step number (that checkpoint or checkpoints.DamagedCheckpointError).
  Errors: FileNotFoundError (no run_config.json, no such checkpoint), StepError,
  ValueError (an unreadable run config or quit head), DamagedCheckpointError.
  """
  state, run, skipped = restore_state(workdir, step, on_skip)
  model_cfg = run["model_config"]
  params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), state.ema_params)
  meta = {"workdir": str(pathlib.Path(workdir).resolve()), "checkpoint_step": int(state.step),
          "data": run.get("data", {}), "train": run.get("train", {})}
  if skipped:
    meta["skipped_damaged_checkpoints"] = skipped
  if step == "best":
    meta["chosen_on"] = run.get("data", {}).get("eval_split")
  head, head_info = model_io.read_quit_head(workdir, model_cfg, f"workdir {workdir}")
  return LoadedModel(params=params, model_config=model_cfg, mean_shape=run["mean_shape"],
                     metadata=meta, dtype="float32", path=str(workdir),
                     quit_head=head, quit_info=head_info, from_workdir=True)
