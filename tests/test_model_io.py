"""The exported model format: round trip in float32 (exact) and bfloat16 (rounded), checks.
The one loading path: a workdir's checkpoint (`restore`) and its export (`load`) give the
same model; 'best'; run_config.json compatibility; the entry points' adapter."""
import json

import jax
import ml_dtypes
import numpy as np
import pytest

from musica_jax import model_io
from musica_jax import restore
from musica_jax.config import ModelConfig

CFG = ModelConfig(num_landmarks=68, patch_indices=tuple(range(0, 68, 4)), hidden_size=32)


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32),
                      model_io.param_template(CFG))


def _mean():
  return np.random.default_rng(1).uniform(50, 180, (68, 2)).astype(np.float32)


def test_round_trip_float32(tmp_path):
  params = _params()
  meta = {"name": "t", "nme": np.float32(4.5), "steps": np.int64(3), "tuple": (1, 2)}
  model_io.save_model(tmp_path / "m", params, CFG, _mean(), meta)
  m = model_io.load_model(tmp_path / "m")
  assert m.model_config == CFG and m.dtype == "float32"
  np.testing.assert_array_equal(m.mean_shape, _mean())
  assert m.metadata == {"name": "t", "nme": 4.5, "steps": 3, "tuple": [1, 2]}
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(m.params)):
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(params) == jax.tree.structure(m.params)


def test_round_trip_bfloat16_halves_the_size(tmp_path):
  params = _params()
  model_io.save_model(tmp_path / "f32", params, CFG, _mean(), {})
  model_io.save_model(tmp_path / "bf16", params, CFG, _mean(), {}, dtype="bfloat16")
  m = model_io.load_model(tmp_path / "bf16")
  assert m.dtype == "bfloat16"
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(m.params)):
    assert b.dtype == np.float32
    np.testing.assert_array_equal(b, a.astype(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_allclose(b, a, rtol=2 ** -8, atol=1e-30)
  size = lambda d: (tmp_path / d / model_io.PARAMS_FILE).stat().st_size
  assert size("bf16") < 0.55 * size("f32")


def test_refuses_bad_inputs_and_files(tmp_path):
  params = _params()
  with pytest.raises(ValueError, match="dtype"):
    model_io.save_model(tmp_path / "x", params, CFG, _mean(), {}, dtype="float16")
  with pytest.raises(ValueError, match="mean_shape"):
    model_io.save_model(tmp_path / "x", params, CFG, _mean()[:10], {})
  other = ModelConfig(num_landmarks=68, patch_indices=tuple(range(0, 68, 2)), hidden_size=32)
  with pytest.raises(ValueError, match="shape"):
    model_io.save_model(tmp_path / "x", params, other, _mean(), {})
  bad = jax.tree.map(lambda x: x, params)
  bad["head"]["bias"] = bad["head"]["bias"].copy()
  bad["head"]["bias"][0, 0] = np.nan
  with pytest.raises(ValueError, match="non-finite"):
    model_io.save_model(tmp_path / "x", bad, CFG, _mean(), {})

  with pytest.raises(FileNotFoundError, match="not a directory"):
    model_io.load_model(tmp_path / "nothing")
  d = model_io.save_model(tmp_path / "m", params, CFG, _mean(), {})
  # A swapped parameter file fails the checksum.
  model_io.save_model(tmp_path / "m2", _params(5), CFG, _mean(), {})
  (d / model_io.PARAMS_FILE).write_bytes((tmp_path / "m2" / model_io.PARAMS_FILE).read_bytes())
  with pytest.raises(ValueError, match="checksum"):
    model_io.load_model(d)
  # A config that does not fit the arrays names the array.
  d = model_io.save_model(tmp_path / "m3", params, CFG, _mean(), {})
  info = json.loads((d / model_io.CONFIG_FILE).read_text())
  info["model_config"]["hidden_size"] = 64
  (d / model_io.CONFIG_FILE).write_text(json.dumps(info))
  with pytest.raises(ValueError, match="model_sha256"):    # model.json's own checksum
    model_io.load_model(d)
  del info["model_sha256"]                                  # as a model exported before it
  (d / model_io.CONFIG_FILE).write_text(json.dumps(info))
  with pytest.raises(ValueError, match="the config needs"):
    model_io.load_model(d)
  (d / model_io.PARAMS_FILE).unlink()
  with pytest.raises(FileNotFoundError, match="params.npz"):
    model_io.load_model(d)


def test_predictor_from_saved_model(tmp_path):
  from musica_jax import predictor
  model_io.save_model(tmp_path / "m", _params(), CFG, _mean(), {"name": "x"}, dtype="bfloat16")
  p = predictor.Predictor.from_model_dir(tmp_path / "m")
  assert p.model_config == CFG and p.metadata["name"] == "x"
  assert p.metadata["param_dtype"] == "bfloat16"


# ---------------------------------------------------------------------------------------
# One loading path: model_io.load / restore, run_config, experiments.common.load_model.


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, make_workdir):
  """A training workdir (checkpoints at steps 2, 4, 6; evaluated on `val`) and the
  metrics.jsonl of its evaluations: step 4 is the best kept one."""
  wd = tmp_path_factory.mktemp("run") / "w"
  make_workdir(wd, data={"dataset": "synthetic_faces", "eval_split": "val"}, mean_shape=_mean())
  lines = [{"step": 1, "eval/nme_interocular": 0.01},     # not kept: never chosen
           {"step": 2, "eval/nme_interocular": 0.05, "train/loss": 1.0},
           {"step": 3, "train/loss": 0.5},
           {"step": 4, "eval/nme_interocular": 0.03},
           {"step": 6, "eval/nme_interocular": 0.04}]
  (wd / restore.METRICS_LOG).write_text(
      "\n".join(json.dumps(r) for r in lines) + '\n{"step": 7, "eval/nme_inter')   # killed
  return wd


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_restore_and_load_of_the_export_give_the_same_model(run_dir, tmp_path):
  from experiments import export_model  # noqa: PLC0415
  export_model.export(str(run_dir), str(tmp_path / "m"))
  restored = restore.restore(run_dir)
  exported = model_io.load(tmp_path / "m")
  assert isinstance(restored, model_io.LoadedModel) and isinstance(exported, model_io.LoadedModel)
  assert restored.from_workdir and not exported.from_workdir
  assert restored.model_config == exported.model_config
  np.testing.assert_array_equal(restored.mean_shape, exported.mean_shape)
  np.testing.assert_array_equal(restored.mean_shape, _mean())
  assert jax.tree.structure(restored.params) == jax.tree.structure(exported.params)
  for a, b in zip(_leaves(restored.params), _leaves(exported.params)):
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(a, b)
  assert restored.metadata["checkpoint_step"] == 6
  assert exported.metadata["source"]["checkpoint_step"] == 6
  assert exported.metadata["source"]["workdir"] == "$WORKDIR"      # portable provenance
  # The EMA weights, not the raw ones (they differ in this workdir).
  state, run, skipped = restore.restore_state(run_dir)
  assert skipped == [] and int(state.step) == 6 and run["data"]["eval_split"] == "val"
  for a, ema, raw in zip(_leaves(restored.params), _leaves(state.ema_params),
                         _leaves(state.params)):
    np.testing.assert_array_equal(a, ema)
    assert not np.array_equal(a, raw)
  # load() dispatches on what the directory holds.
  via_load = model_io.load(run_dir, step=2)
  assert via_load.from_workdir and via_load.metadata["checkpoint_step"] == 2
  with pytest.raises(model_io.StepError, match="exported model"):
    model_io.load(tmp_path / "m", step="best")


def test_best_is_the_kept_checkpoint_with_the_lowest_evaluation(run_dir, tmp_path):
  from experiments import common  # noqa: PLC0415
  best = restore.restore(run_dir, "best")
  assert best.metadata["checkpoint_step"] == 4 and best.metadata["chosen_on"] == "val"
  assert "chosen_on" not in restore.restore(run_dir, 4).metadata
  info = common.model_provenance(best)          # what evaluate writes into its JSON
  assert info["checkpoint_chosen_on"] == "val" and info["checkpoint_step"] == 4
  assert "checkpoint_chosen_on" not in common.model_provenance(restore.restore(run_dir))
  assert restore.best_step(run_dir, [2, 6]) == 6
  with pytest.raises(model_io.StepError, match="no checkpoint"):
    restore.best_step(run_dir, [3])
  # An export of the best checkpoint keeps where it was chosen.
  from experiments import export_model  # noqa: PLC0415
  export_model.export(str(run_dir), str(tmp_path / "m"), checkpoint="best")
  exported = common.model_provenance(model_io.load(tmp_path / "m"))
  assert exported["checkpoint_chosen_on"] == "val" and exported["checkpoint_step"] == 4
  # The results table reads the key evaluate writes (here without a workdir to look in).
  from experiments import results_table  # noqa: PLC0415
  split = {"faces": 1, "nme_interpupil": 5.0, "nme_interocular": 3.5, "fr_008": 0.0,
           "auc_008": 0.5}
  (tmp_path / "eval.json").write_text(json.dumps(
      {**exported, "trained_in": None, "splits": {"common": split},
       "model": {"num_landmarks": 68, "patch_indices": list(range(19))}}))
  assert results_table.rows_from(str(tmp_path / "eval.json"), "common")[0]["chosen_on"] == "val"


def test_run_config_reads_older_and_newer_files(tmp_path):
  from musica_jax import run_config  # noqa: PLC0415
  from musica_jax import training  # noqa: PLC0415
  with pytest.raises(FileNotFoundError, match="training workdir"):
    run_config.load(tmp_path)
  run_config.save(tmp_path, CFG, {"eval_split": "val"}, training.TrainConfig(steps=7), _mean(),
                  loop={"eval_every": 5})
  raw = json.loads((tmp_path / run_config.RUN_CONFIG).read_text())
  assert set(raw) == {"model", "data", "train", "mean_shape", "loop"}
  del raw["train"]["lr_schedule"], raw["train"]["warmup_steps"]   # written before they existed
  raw["train"]["from_the_future"] = 1                               # written by a newer version
  (tmp_path / run_config.RUN_CONFIG).write_text(json.dumps(raw))
  run = run_config.load(tmp_path)
  assert run["train_config"] == training.TrainConfig(steps=7)
  assert run["model_config"] == CFG and run["loop"] == {"eval_every": 5}
  np.testing.assert_array_equal(run["mean_shape"], _mean())
  raw["model"]["new_layer"] = 3                                     # would change the network
  (tmp_path / run_config.RUN_CONFIG).write_text(json.dumps(raw))
  with pytest.raises(ValueError, match="new_layer"):
    run_config.load(tmp_path)


def test_the_entry_points_adapter_names_the_flag(run_dir, tmp_path):
  from absl import app  # noqa: PLC0415
  from experiments import common  # noqa: PLC0415
  cases = [((None, None), "exactly one of --workdir"),
           ((str(run_dir), "default"), "exactly one of --workdir"),
           ((str(run_dir), None, "newest"), "--checkpoint=newest"),
           ((str(run_dir), None, "5"), f"--workdir={run_dir} --checkpoint=5"),
           ((str(tmp_path), None), f"--workdir={tmp_path} --checkpoint=latest"),
           ((None, str(tmp_path / "nowhere")), "not a directory")]
  for args, message in cases:
    with pytest.raises(app.UsageError, match=message):
      common.load_model(*args)
  (tmp_path / "w").mkdir()
  (tmp_path / "w" / "run_config.json").write_text((run_dir / "run_config.json").read_text())
  (tmp_path / "w" / "checkpoints").mkdir()
  with pytest.raises(app.UsageError, match="--checkpoint=best: .*no checkpoint"):
    common.load_model(str(tmp_path / "w"), None, "best")
  assert common.load_model(str(run_dir), None, "2").metadata["checkpoint_step"] == 2
