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
from musica_jax import model_io
from musica_jax import predictor as predictor_lib
from musica_jax import quit_head
from musica_jax import schedules
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
  with pytest.raises(ValueError, match="stage_patches needs global_attention='none'"):
    config_lib.for_scheme(68, 34, stage_patches=(9, 17, 34), global_attention="fc")
  assert config_lib.for_scheme(68, 34, stage_patches=(34, 34, 34)).stage_patches == ()


def test_scan_fast_path_and_reference_loop_agree_and_differ_from_all_patches():
  params = _params(CFG)
  images, init, _ = _inputs(CFG, batch=4)
  out = cascade.run_cascade_jit(params, images, init, CFG)
  ref = run_cascade_unrolled(params, images, init, CFG)
  fc = fast_inference.FastCascade(params, CFG)
  # Stage 0 reads 2 patches: its kernel keeps their rows and the hidden state's only.
  assert fc.stage_params[0]["recurrent"]["u"].shape[0] == 2 * CFG.descriptor_size + 32
  assert fc.stage_params[2]["recurrent"]["u"].shape[0] == CFG.recurrent_input_size
  fast = fc.run(images, init)
  unsliced = fast_inference.run_selective(fast_inference.unstack_params(params), None, images,
                                          init, CFG, selective=False)
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
  a = cascade.run_cascade_jit(params, images, init, CFG)
  b = cascade.run_cascade_jit(changed, images, init, CFG)
  np.testing.assert_allclose(a.shapes[0], b.shapes[0], atol=1e-5)
  changed_read = {**params, "recurrent": {**params["recurrent"],
                                          "u": u.at[0, :d].add(5.0)}}  # patch 0: read
  c = cascade.run_cascade_jit(changed_read, images, init, CFG)
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
  assert train_config(["--flagfile=300w34.flags", "--train_stages=0,1"],
                      tmp_path).train.train_stages == (0, 1)
  with pytest.raises(app.UsageError, match=r"^--train_stages=0,3: the model has 3 iterations"):
    train_config(["--flagfile=300w34.flags", "--train_stages=0,3"], tmp_path)
  with pytest.raises(app.UsageError, match="train_stages must be distinct"):
    train_config(["--flagfile=300w34.flags", "--train_stages=1,1"], tmp_path)


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
  # The same weights exported reading the full schedule, or the run's.
  from experiments import export_model  # noqa: PLC0415
  full = tmp_path / "full"
  export_model.export(str(work), str(full), stage_patches=(config.model.num_patches,) * 2)
  assert model_io.load_model(full).model_config.stage_patches == ()
  with pytest.raises(app.UsageError, match=r"^--stage_patches: stage_patches must be"):
    export_model.export(str(work), str(tmp_path / "bad"), stage_patches=(3, 200))

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


def _policy(cfg, nme_full, nme_one):
  """An estimated-error policy of a 3-iteration schedule: faces spread evenly, policy NME
  falling linearly from nme_one (1 iteration) to nme_full (3)."""
  return {"design": "E", "kind": "estimated_error",
          "profile": [[1.0, 0.0, 0.0], [2.0, 1.0, 0.0], [3.0, 1.0, 1.0]],
          "thresholds": [[0.2, 1.0], [0.05, 2.0], [0.0, 3.0]],
          "nme_profile": [[1.0, nme_one], [2.0, (nme_one + nme_full) / 2], [3.0, nme_full]]}


def test_choose_takes_the_schedule_of_lowest_validation_nme_at_the_budget():
  full = config_lib.for_scheme(68, 34, recurrent_rank=128)
  cheap = dataclasses.replace(full, stage_patches=(9, 17, 34))
  cands = [(full, _policy(full, 0.036, 0.046)), (cheap, _policy(cheap, 0.039, 0.055))]
  m_full, m_cheap = cost.cascade_macs(full) / 1e6, cost.cascade_macs(cheap) / 1e6
  # At the cheap schedule's whole cascade: the full one's dial would have ~1.8 iterations
  # (NME ~0.044), the cheap cascade gives 0.039.
  assert schedules.choose(cands, m_cheap) == (1, None, None)
  i, it, _ = schedules.choose(cands, 0.5 * (cost.cascade_macs(cheap, 1) + cost.cascade_macs(
      cheap, 2)) / 1e6)
  assert i == 1 and it == pytest.approx(1.5)
  assert schedules.choose(cands, m_full) == (0, None, None)          # the most accurate
  # Below one iteration of the full schedule only the cheap one can serve.
  assert schedules.choose(cands, cost.cascade_macs(cheap, 1) / 1e6)[0] == 1
  # Without NME profiles: the model's own schedule.
  assert schedules.choose([(full, None), (cheap, {})], m_cheap) == (0, None, None)
  # The own policy without one (fitted before profiles were kept) is not compared with a
  # schedule that has one: it would lose at every budget, its full cascade included.
  no_profile = {k: v for k, v in cands[0][1].items() if k != "nme_profile"}
  assert schedules.choose([(full, no_profile), cands[1]], m_full) == (0, None, None)
  assert schedules.choose([(full, no_profile), cands[1]], m_cheap) == (0, None, None)


def tiny_model_dir(tmp_path):
  """(directory of a saved tiny model reading every patch, its config, params, mean
  shape, the config of its cheap schedule 2, 4, 6)."""
  cfg = dataclasses.replace(CFG, stage_patches=())
  params = _params(cfg, scale=10.0)
  mean = np.tile(np.linspace(20, 44, 10)[:, None], (1, 2)).astype(np.float32)
  d = tmp_path / "m"
  model_io.save_model(d, params, cfg, mean, {"name": "tiny"})
  return d, cfg, params, mean, dataclasses.replace(cfg, stage_patches=(2, 4, 6))


def test_predict_with_budget_mmacs_runs_the_schedule_that_serves_it(tmp_path):
  d, cfg, params, mean, cheap = tiny_model_dir(tmp_path)
  quit_head.save(d, None, _policy(cfg, 0.036, 0.046))
  quit_head.save(d, None, _policy(cheap, 0.039, 0.055), schedules.suffix(cfg, cheap))
  assert (d / "quit_head@2_4_6.json").is_file()
  assert schedules.available(d) == [(2, 4, 6)]
  p = predictor_lib.Predictor.from_model_dir(d, max_batch=4)
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)
  boxes = [[20, 20, 70, 70], [25, 15, 75, 68]]
  m_cheap = cost.cascade_macs(cheap) / 1e6
  sub, it, esc = p.for_budget_mmacs(m_cheap)
  assert sub.model_config.stage_patches == (2, 4, 6) and it is None and esc is None
  assert sub.quit_info["nme_profile"][-1][1] == 0.039
  got = p.predict(image, boxes, budget_mmacs=m_cheap)
  ref = predictor_lib.Predictor(params, cheap, mean, max_batch=4).predict(image, boxes)
  np.testing.assert_allclose(got.landmarks, ref.landmarks, atol=1e-3)
  plain = p.predict(image, boxes)                        # no budget: the model's own
  assert float(np.abs(plain.landmarks - got.landmarks).max()) > 1e-3
  np.testing.assert_allclose(p.predict(image, boxes, budget_mmacs=cost.cascade_macs(cfg) / 1e6)
                             .landmarks, plain.landmarks, atol=1e-4)
  assert p.stream(budget_mmacs=m_cheap).predictor is sub
  # evaluate --budget_mmacs makes the same choice on the loaded model.
  loaded, c = schedules.for_budget_mmacs(model_io.load_model(d), m_cheap)
  assert loaded.model_config.stage_patches == (2, 4, 6) and c.iterations is None
  assert loaded.quit_info["nme_profile"][-1][1] == 0.039
  assert schedules.for_budget_mmacs(model_io.load_model(d), cost.cascade_macs(cfg) / 1e6) is None
  # A schedule that does not fit the model: one line naming the model.
  with pytest.raises(ValueError, match="stage_patches must be"):
    schedules.with_schedule(model_io.load_model(d), (2, 4))
  # The entry points' one loader reads "DIR@2_4_6" (evaluate, robust_val, dial_benchmark...):
  # that schedule with its policy; a schedule that does not fit is a usage error.
  from absl import app  # noqa: PLC0415

  from experiments import common  # noqa: PLC0415
  got = common.load_model(None, f"{d}@2_4_6")
  assert got.model_config.stage_patches == (2, 4, 6)
  assert got.quit_info["nme_profile"][-1][1] == 0.039
  assert common.load_model(None, str(d)).model_config.stage_patches == ()
  with pytest.raises(app.UsageError, match="stage_patches must be"):
    common.load_model(None, f"{d}@2_4")


def test_a_model_name_may_carry_a_schedule():
  assert schedules.split_model_name("default@9_17_34") == ("default", (9, 17, 34))
  assert schedules.split_model_name("/m/x@17,34,34") == ("/m/x", (17, 34, 34))
  assert schedules.split_model_name("default") == ("default", None)
  assert schedules.split_model_name("/runs/a@b/model") == ("/runs/a@b/model", None)
  from experiments import dial_benchmark_lib  # noqa: PLC0415
  assert dial_benchmark_lib._model_path("default@9_17_34") == "default@9_17_34"  # noqa: SLF001


def test_a_schedule_with_its_own_stages_leaves_the_model_as_it_was(
    tmp_path, tiny_two_level_flags, train_config):
  from experiments import attach_schedule  # noqa: PLC0415
  from experiments import common  # noqa: PLC0415
  from experiments import export_model  # noqa: PLC0415
  from musica_jax import restore  # noqa: PLC0415
  base_run, base = tmp_path / "base_run", tmp_path / "base"
  train_lib.train_and_evaluate(train_config([*tiny_two_level_flags, "--steps=1"], base_run),
                               str(base_run))
  export_model.export(str(base_run), str(base), dtype="bfloat16")
  files = {f.name: f.read_bytes() for f in base.iterdir()}
  # The cheap schedule (1 then 2 patches) trains its first stage only; the last is frozen.
  work = tmp_path / "cheap"
  cfg = train_config([*tiny_two_level_flags, f"--init_from={base}", "--stage_patches=1,2",
                      "--train_stages=0", "--steps=2", "--learning_rate=1e-2"], work)
  train_lib.train_and_evaluate(cfg, str(work))
  assert run_config.load(work)["train_config"].train_stages == (0,)
  run, own = restore.restore(str(work)), model_io.load_model(base)
  r, o = model_io.flatten_params(run.params), model_io.flatten_params(own.params)
  assert all(np.array_equal(r[k][1], o[k][1]) for k in o)        # frozen: bit for bit
  assert any(not np.allclose(r[k][0], o[k][0]) for k in o)       # trained

  path, schedule, stages = attach_schedule.attach(str(base), str(work), "latest")
  assert path.name == "stages@1_2.npz" and schedule == (1, 2) and stages == (0,)
  assert {f.name: f.read_bytes() for f in base.iterdir() if f.name in files} == files
  # MODEL@1_2 runs the run's weights (bf16 as the model); the model itself is unchanged.
  got = common.load_model(None, f"{base}@1_2")
  assert got.model_config.stage_patches == (1, 2)
  as_bf16 = jax.tree.map(schedules._bf16, run.params)  # noqa: SLF001
  images, init = _inputs(got.model_config)[0], jnp.asarray(got.mean_shape)
  out = cascade.run_cascade(got.params, images, init, got.model_config)
  ref = cascade.run_cascade(as_bf16, images, init, got.model_config)
  np.testing.assert_allclose(out.shapes, ref.shapes, atol=1e-4)
  plain = cascade.run_cascade(own.params, images, init, got.model_config)
  assert float(jnp.abs(plain.shapes[-1] - out.shapes[-1]).max()) > 1e-3
  assert common.load_model(None, str(base)).params["conv1"]["kernel"][0].tolist() == \
      own.params["conv1"]["kernel"][0].tolist()
  # Refused: a run that trained every stage, and stages made for other weights.
  with pytest.raises(app.UsageError, match="trained every stage"):
    attach_schedule.attach(str(base), str(base_run), "latest")
  other = tmp_path / "other"
  export_model.export(str(base_run), str(other), dtype="float32")
  (other / path.name).write_bytes(path.read_bytes())
  with pytest.raises(app.UsageError, match="made for other weights"):
    common.load_model(None, f"{other}@1_2")


def test_an_installed_policy_compares_schedules_on_the_held_out_val_faces(tmp_path):
  # The schedule choice reads "nme_profile": the held-out val faces' NME per mean
  # iterations, not the augmented stream's (kept as "nme_profile_stream").
  from experiments import fit_quit_head_lib  # noqa: PLC0415
  rng = np.random.default_rng(0)

  def data(faces, start):
    nme = np.stack([np.full(faces, start), np.full(faces, start / 2), np.full(faces, 0.03)])
    return {"E": nme + rng.uniform(0, 1e-3, nme.shape), "nme": nme,
            "feats": np.zeros((3, faces, 4))}
  sets = {"val": data(40, 0.20), "held_out": data(10, 0.08),
          "escalation": [[None, 0.0, 22.8, 0.03], [0.05, 0.1, 26.6, 0.029]]}
  fit_quit_head_lib._install("E", {}, sets, {"budget": {}, "command": "test"},  # noqa: SLF001
                             tmp_path, 3)
  _, info = quit_head.load(tmp_path, 3, 8)
  assert info["escalation"] == sets["escalation"] and len(info["escalation_columns"]) == 4
  held, stream = np.asarray(info["nme_profile"]), np.asarray(info["nme_profile_stream"])
  assert held[:, 1].max() == pytest.approx(0.08) and stream[:, 1].max() == pytest.approx(0.20)
  assert held[np.argmax(held[:, 0]), 1] == pytest.approx(0.03)
  assert "val split" in info["profile_faces"]
