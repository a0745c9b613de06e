"""Cheap early iterations (`ModelConfig.stage_patches`, --stage_patches): iteration i reads
k_i of the P patches. The scanned cascade (all patches computed, the unread ones masked),
the one-stage-at-a-time fast path (only the read patches computed) and the reference loop
agree; what a stage does not read cannot change it; the cost counts each iteration's
patches; training's all_patches_every trains the full schedule on alternate steps."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app

from experiments import train_lib
from musica_jax import budget
from musica_jax import cascade
from musica_jax import config as config_lib
from musica_jax import cost
from musica_jax import factorise
from musica_jax import fast_inference
from musica_jax import run_config
from musica_jax import schemes
from musica_jax import stage_net
from musica_jax import training
from tests.test_cascade import _inputs, run_cascade_unrolled

CFG = config_lib.ModelConfig(num_landmarks=10, patch_indices=(0, 2, 4, 6, 8, 9),
                             hidden_size=32, image_size=64, recurrent_rank=8,
                             stage_patches=(2, 4, 6))


def _params(cfg, scale=30.0):
  # Larger weights than the init's, so every patch moves the answer measurably.
  return jax.tree.map(lambda x: x * scale, stage_net.init_stacked(jax.random.key(1), cfg))


def test_positions_spread_over_the_patch_list_and_the_config_checks_counts():
  cfg = config_lib.for_scheme(68, 34, stage_patches=(9, 17, 34))
  first = [cfg.patch_indices[j] for j in cfg.stage_patch_positions(0)]
  assert first == [0, 8, 16, 22, 31, 38, 43, 51, 66]    # jaw, chin, brows, nose, eyes, mouth
  assert [len(cfg.stage_patch_positions(i)) for i in range(3)] == [9, 17, 34]
  assert cfg.patches_per_stage == (9, 17, 34)
  assert config_lib.for_scheme(68, 34).patches_per_stage == (34, 34, 34)
  for bad in ((9, 17), (0, 17, 34), (9, 17, 35)):
    with pytest.raises(ValueError, match="stage_patches must be empty or 3 counts"):
      config_lib.for_scheme(68, 34, stage_patches=bad)


def test_scan_fast_path_and_reference_loop_agree_and_differ_from_all_patches():
  params = _params(CFG)
  images, init, _ = _inputs(CFG, batch=4)
  out = cascade.run_cascade(params, images, init, CFG)
  ref = run_cascade_unrolled(params, images, init, CFG)
  fc = fast_inference.FastCascade(params, CFG)
  # Stage 0 reads 2 patches: its kernel keeps their rows and the hidden state's only.
  assert fc.stage_params[0]["recurrent"]["u"].shape[0] == 2 * CFG.descriptor_size + 32
  assert fc.stage_params[2]["recurrent"]["u"].shape[0] == CFG.recurrent_input_size
  fast = fc.run(images, init)
  unsliced = fast_inference.run_selective(fast_inference.unstack_params(params), None, images,
                                          init, CFG)
  np.testing.assert_allclose(unsliced.landmarks, fast.landmarks, atol=2e-3)
  np.testing.assert_allclose(out.shapes, ref.shapes, atol=2e-3)
  np.testing.assert_allclose(fast.landmarks, out.landmarks, atol=2e-3)
  np.testing.assert_allclose(fast.estimated_error, out.estimated_error, atol=1e-4)
  every = cascade.run_cascade(params, images, init, dataclasses.replace(CFG, stage_patches=()))
  assert float(jnp.abs(every.landmarks - out.landmarks).max()) > 0.1
  # The attention of an unread patch is reported as 0.
  assert float(jnp.abs(out.attention[0][:, [1, 2, 3, 4]]).max()) == 0.0
  # A traced mask of all ones (training's all_patches_every) is the all-patches cascade.
  ones = cascade.run_cascade(params, images, init, CFG, patch_mask=jnp.ones((3, 6)))
  np.testing.assert_allclose(ones.landmarks, every.landmarks, atol=1e-4)


def test_what_a_stage_does_not_read_cannot_change_it():
  params = _params(CFG)
  images, init, _ = _inputs(CFG, batch=3)
  d = CFG.descriptor_size
  unread = [p for p in range(CFG.num_patches) if p not in CFG.stage_patch_positions(0)]
  u = params["recurrent"]["u"]
  rows = np.concatenate([np.arange(p * d, (p + 1) * d) for p in unread])
  changed = {**params, "recurrent": {**params["recurrent"],
                                     "u": u.at[0, rows].add(5.0)}}   # stage 0 only
  a = cascade.run_cascade(params, images, init, CFG)
  b = cascade.run_cascade(changed, images, init, CFG)
  np.testing.assert_allclose(a.shapes[0], b.shapes[0], atol=1e-5)
  changed_read = {**params, "recurrent": {**params["recurrent"],
                                          "u": u.at[0, :d].add(5.0)}}  # patch 0: read
  c = cascade.run_cascade(changed_read, images, init, CFG)
  assert float(jnp.abs(c.shapes[0] - a.shapes[0]).max()) > 1e-3


def test_cost_counts_each_iterations_patches():
  full = config_lib.for_scheme(68, 34, recurrent_rank=128)
  cheap = dataclasses.replace(full, stage_patches=(9, 17, 34))
  per_full = cost.iteration_macs(full)
  per = cost.iteration_macs(cheap)
  assert per[2] == per_full[2] and per[0] < per[1] < per[2]
  first, every = cost.stage_macs(cheap, 0), cost.stage_macs(full)
  for part in ("conv1", "conv2", "attention"):
    assert first[part] * 34 == every[part] * 9
  # The recurrent product multiplies the read patches' rows only (the fast path's).
  assert first["recurrent"] == 128 * (9 * 256 + 512 + 512)
  assert first["head"] == every["head"]
  assert cost.cascade_macs(cheap) == pytest.approx(sum(per))
  assert cost.cascade_macs(cheap, 2) == pytest.approx(per[0] + per[1])
  assert cost.mean_macs(cheap, [1, 3]) == pytest.approx((per[0] + sum(per)) / 2)
  assert cost.cascade_macs(full, 1.5) == pytest.approx(1.5 * per_full[0])
  # MMACs -> mean iterations through the quitting profile (fraction reaching stages 1, 2).
  info = {"profile": [[1.0, 0.0, 0.0], [2.0, 1.0, 0.0], [3.0, 1.0, 1.0]]}
  m = (per[0] + per[1]) / 1e6
  assert budget.mmacs_to_iterations(cheap, info, m) == pytest.approx(2.0)
  assert budget.mmacs_to_iterations(full, info, 1.5 * per_full[0] / 1e6) == pytest.approx(1.5)
  with pytest.raises(ValueError, match="got 30 MMACs"):
    budget.budget_iterations(cheap, info, budget_mmacs=30.0)


def test_a_model_converts_to_a_schedule_with_every_parameter_kept():
  full = config_lib.for_scheme(68, 34, recurrent_rank=128)
  factorise.check_compatible(full, dataclasses.replace(full, stage_patches=(9, 17, 34)))


def test_flags_check_the_schedule(train_config, tmp_path):
  cfg = train_config(["--flagfile=300w34.flags", "--stage_patches=9,17,34",
                      "--all_patches_every=2"], tmp_path)
  assert cfg.model.stage_patches == (9, 17, 34) and cfg.train.all_patches_every == 2
  with pytest.raises(app.UsageError, match=r"^--stage_patches: "):
    train_config(["--flagfile=300w34.flags", "--stage_patches=9,17"], tmp_path)
  with pytest.raises(app.UsageError, match=r"^--all_patches_every: needs --stage_patches"):
    train_config(["--flagfile=300w34.flags", "--all_patches_every=2"], tmp_path)


def test_a_tiny_run_alternates_schedules_and_records_them(tmp_path, tiny_two_level_flags,
                                                          train_config):
  from data_pipelines import input_pipeline  # noqa: PLC0415
  work = tmp_path / "w"
  config = train_config([*tiny_two_level_flags, "--stage_patches=1,2",
                         "--all_patches_every=2", "--steps=2"], work)
  train_lib.train_and_evaluate(config, str(work))
  run = run_config.load(work)
  assert run["model_config"].stage_patches == (1, 2)
  assert run["train_config"].all_patches_every == 2

  # Step 0 (0 % 2 == 0) reads every patch at every iteration: the recurrent rows of the
  # patches stage 0 skips get a gradient; step 1 reads the schedule: they get none.
  mcfg = config.model
  state = training.create_train_state(mcfg, config.train)
  batch = next(input_pipeline.train_iterator(config.data, start_step=0))
  batch = {k: jnp.asarray(v) for k, v in batch.items() if np.asarray(v).dtype.kind in "biuf"}
  init = jnp.asarray(run["mean_shape"])
  step = jax.jit(functools.partial(training.train_step, model_cfg=mcfg,
                                   train_cfg=config.train, scheme=schemes.get_scheme(68)))
  d = mcfg.descriptor_size
  skipped = [p for p in range(mcfg.num_patches) if p not in mcfg.stage_patch_positions(0)]
  rows = np.concatenate([np.arange(p * d, (p + 1) * d) for p in skipped])
  key = "u" if mcfg.recurrent_rank else "kernel"

  def moved(before, after):
    a, b = before.params["recurrent"][key][0], after.params["recurrent"][key][0]
    return float(jnp.abs(b[rows] - a[rows]).max())

  s1, _ = step(state, batch, init)
  assert moved(state, s1) > 0
  odd = state.replace(step=jnp.ones((), jnp.int32))     # fresh Adam moments, step 1
  s2, _ = step(odd, batch, init)
  assert moved(odd, s2) == 0.0
