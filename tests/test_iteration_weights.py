"""Per-iteration loss weights (`TrainConfig.iteration_weights`, --iteration_weights): every
prefix of the cascade is trained as an answer with its own weight, the option is validated,
recorded in run_config.json and restored, and a tiny run's first loss is the weighted one."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app

from experiments import train_lib
from musica_jax import cascade
from musica_jax import config as config_lib
from musica_jax import losses
from musica_jax import run_config
from musica_jax import schemes
from musica_jax import training


def _shapes_and_target():
  target = jnp.asarray([[[0.0, 0.0], [10.0, 0.0], [5.0, 5.0], [5.0, 8.0]]])
  shapes = jnp.stack([target.at[0, 2, 0].add(4.0), target.at[0, 2, 0].add(2.0),
                      target.at[0, 2, 0].add(1.0)])          # losses 0.1, 0.05, 0.025
  return shapes, jnp.asarray([[0.0], [0.5], [0.0]]), target


def test_weights_scale_each_iterations_landmark_term_and_keep_the_error_term():
  shapes, errors, target = _shapes_and_target()
  plain, parts = losses.cascade_loss(shapes, errors, target, (0, 1))
  np.testing.assert_allclose(parts["landmark_loss"], [0.1, 0.05, 0.025], rtol=1e-6)
  err = 0.05 * (0.1 + 0.45 + 0.025)
  assert float(plain) == pytest.approx(0.95 * 0.175 + err, rel=1e-6)
  # 3,2,1 scaled to sum 3: 1.5, 1, 0.5.
  weighted, _ = losses.cascade_loss(shapes, errors, target, (0, 1), iteration_weights=(3, 2, 1))
  assert float(weighted) == pytest.approx(0.95 * (1.5 * 0.1 + 0.05 + 0.5 * 0.025) + err,
                                          rel=1e-6)
  # Every iteration's answer gets its own gradient, in proportion to its weight (0.95/40 per
  # unit x with weight 1); a zero weight leaves that prefix untrained.
  grad = lambda w: jax.grad(lambda s: losses.cascade_loss(s, errors, target, (0, 1),
                                                          iteration_weights=w)[0])(shapes)
  np.testing.assert_allclose(grad((3, 2, 1))[:, 0, 2, 0], np.array([1.5, 1.0, 0.5]) * 0.95 / 40,
                             rtol=1e-6)
  np.testing.assert_allclose(grad((0, 1, 1))[:, 0, 2, 0], np.array([0, 1.5, 1.5]) * 0.95 / 40,
                             rtol=1e-6)
  with pytest.raises(ValueError, match="iteration_weights has 2 values, the model has 3"):
    losses.cascade_loss(shapes, errors, target, (0, 1), iteration_weights=(1, 1))


def test_the_config_validates_the_weights():
  assert config_lib.TrainConfig().iteration_weights == ()
  assert config_lib.TrainConfig(iteration_weights=["3", 2]).iteration_weights == (3.0, 2.0)
  for bad in ((1, -1), (0, 0), ("x",), (float("nan"), 1), (float("inf"), 1)):
    with pytest.raises(ValueError, match="iteration_weights"):
      config_lib.TrainConfig(iteration_weights=bad)


def test_the_flag_names_a_bad_value_in_one_line(train_config, tmp_path):
  cfg = train_config(["--flagfile=300w34.flags", "--iteration_weights=3,2,1"], tmp_path)
  assert cfg.train.iteration_weights == (3.0, 2.0, 1.0)
  assert train_config(["--flagfile=300w34.flags"], tmp_path).train.iteration_weights == ()
  with pytest.raises(app.UsageError, match=r"^--iteration_weights: 2 values for 3 iterations"):
    train_config(["--flagfile=300w34.flags", "--iteration_weights=2,1"], tmp_path)
  with pytest.raises(app.UsageError, match=r"^--iteration_weights: .*non-negative"):
    train_config(["--flagfile=300w34.flags", "--iteration_weights=1,-1,1"], tmp_path)


def test_a_tiny_run_trains_the_weighted_loss_and_records_it(tmp_path, tiny_two_level_flags,
                                                            train_config):
  from data_pipelines import input_pipeline  # noqa: PLC0415
  work = tmp_path / "w"
  config = train_config([*tiny_two_level_flags, "--iteration_weights=4,1", "--steps=2"], work)
  train_lib.train_and_evaluate(config, str(work))
  run = run_config.load(work)
  assert run["train"]["iteration_weights"] == [4.0, 1.0]
  assert run["train_config"].iteration_weights == (4.0, 1.0)

  # train_step trains the weighted sum over both prefixes of the cascade: its loss on the
  # run's first batch, at parameters whose iterations give different answers.
  state = training.create_train_state(config.model, config.train)
  head = state.params["head"]
  noise = jax.random.normal(jax.random.key(3), head["bias"].shape)
  head = {**head, "bias": head["bias"] + 20 * noise}
  state = state.replace(params={**state.params, "head": head})
  batch = next(input_pipeline.train_iterator(config.data, start_step=0))
  batch = {k: jnp.asarray(v) for k, v in batch.items() if np.asarray(v).dtype.kind in "biuf"}
  init = jnp.asarray(run["mean_shape"])
  scheme = schemes.get_scheme(68)
  step = jax.jit(functools.partial(training.train_step, model_cfg=config.model,
                                   train_cfg=config.train, scheme=scheme))
  _, logged = step(state, batch, init)
  out = cascade.run_cascade_jit(state.params, batch["image"], init, config.model)
  mask = batch.get("mask")
  mask = None if mask is None else mask.astype(jnp.float32)
  _, parts = losses.cascade_loss(out.shapes, out.errors, batch["landmarks"],
                                 scheme.outer_eye_corners, mask)
  lm, er = np.asarray(parts["landmark_loss"]), np.asarray(parts["error_loss"])
  assert abs(lm[0] - lm[1]) > 0.01 * lm.sum()        # the weights make a difference here
  expected = 0.95 * (1.6 * lm[0] + 0.4 * lm[1]) + 0.05 * er.sum()
  assert float(logged["loss"]) == pytest.approx(float(expected), rel=1e-4)
  assert (work / "metrics.jsonl").is_file()
