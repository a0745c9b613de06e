"""The factored recurrent layer (`ModelConfig.recurrent_rank`): parameters, forward, bf16
storage, MAC and parameter counts, save / load / StableHLO export, the SVD conversion
(`musica_jax.factorise`) and fine-tuning from a saved model (`TrainConfig.init_from`)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common
from experiments import train
from experiments import train_lib
from musica_jax import cascade
from musica_jax import config as config_lib
from musica_jax import cost
from musica_jax import factorise
from musica_jax import fast_inference
from musica_jax import losses
from musica_jax import model_io
from musica_jax import portable
from musica_jax import predictor as predictor_lib
from musica_jax import pyramid
from musica_jax import restore
from musica_jax import run_config
from musica_jax import schemes
from musica_jax import stage_net

@pytest.fixture(autouse=True)
def _highest_precision():
  """Two compute paths are compared at full float32 on every backend (NVIDIA GPUs run
  float32 products as TF32 by default); on a CPU this changes nothing."""
  with jax.default_matmul_precision("highest"):
    yield


SMALL = config_lib.ModelConfig(num_landmarks=10, patch_indices=(0, 2, 4, 6, 8, 9),
                               hidden_size=64, image_size=64)
RANK = 8


def _cfg(rank, base=SMALL, **kw):
  return config_lib.ModelConfig(**{**base.__dict__, "recurrent_rank": rank, **kw})


def _params(cfg, seed=0):
  """Random parameters whose heads move the landmarks by a few pixels and give errors
  that differ between faces; recurrent weights large enough to matter."""
  params = stage_net.init_stacked(jax.random.key(seed), cfg)
  k1, k2, k3 = jax.random.split(jax.random.key(seed + 100), 3)
  kernel = params["head"]["kernel"]
  params["head"]["kernel"] = kernel.at[:, :, -1].set(2.0 * jax.random.normal(k1, kernel.shape[:2]))
  bias = params["head"]["bias"]
  params["head"]["bias"] = bias.at[:, :-1].set(3.0 * jax.random.normal(k2, bias[:, :-1].shape))
  params["recurrent"] = {k: (v * 4 if k != "bias" else 0.1 * jax.random.normal(k3, v.shape))
                         for k, v in params["recurrent"].items()}
  return jax.tree.map(np.asarray, params)


def _inputs(cfg, batch, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed + 7))
  images = jax.random.normal(k1, (batch, cfg.image_size, cfg.image_size, 3))
  init = jax.random.uniform(k2, (cfg.num_landmarks, 2), minval=8, maxval=cfg.image_size - 8)
  return images, init


def _densified(params):
  rec = params["recurrent"]
  return {**params, "recurrent": {"bias": rec["bias"], "kernel": np.matmul(rec["u"], rec["v"])}}


# --- config and parameters -----------------------------------------------------------------

def test_rank_is_validated():
  assert config_lib.ModelConfig().recurrent_rank == 0
  top = min(SMALL.recurrent_input_size, SMALL.hidden_size)
  assert SMALL.recurrent_input_size == 6 * 256 + 64 and top == 64
  _cfg(top)
  for bad in (-1, top + 1, 2.5, True):
    with pytest.raises(ValueError, match="recurrent_rank must be 0"):
      _cfg(bad)
  assert _cfg(np.int64(3)).recurrent_rank == 3 and type(_cfg(np.int64(3)).recurrent_rank) is int


def test_the_flags_make_the_config_and_name_a_bad_rank(parse_flags, tmp_path):
  from absl import app  # noqa: PLC0415
  cfg = _config(parse_flags, ["--flagfile=300w34.flags", "--recurrent_rank=128",
                              "--init_from=default"], tmp_path)
  assert cfg.model.recurrent_rank == 128 and cfg.train.init_from == "default"
  assert _config(parse_flags, ["--flagfile=300w34.flags"], tmp_path).train.init_from == ""
  with pytest.raises(app.UsageError, match=r"^--recurrent_rank: .* 1\.\.512 .* got 600"):
    _config(parse_flags, ["--flagfile=300w34.flags", "--recurrent_rank=600"], tmp_path)


def test_rank_zero_keeps_the_parameter_tree_and_the_rank_only_changes_the_recurrent_layer():
  dense = stage_net.init_stacked(jax.random.key(0), SMALL)
  assert SMALL == _cfg(0)
  assert set(dense["recurrent"]) == {"kernel", "bias"}
  assert dense["recurrent"]["kernel"].shape == (3, SMALL.recurrent_input_size, 64)
  fact = stage_net.init_stacked(jax.random.key(0), _cfg(RANK))
  assert jax.tree.map(np.shape, fact["recurrent"]) == {
      "u": (3, SMALL.recurrent_input_size, RANK), "v": (3, RANK, 64), "bias": (3, 64)}
  for name in dense:                       # same keys: every other layer is bit-identical
    if name != "recurrent":
      for a, b in zip(jax.tree.leaves(dense[name]), jax.tree.leaves(fact[name])):
        np.testing.assert_array_equal(a, b)


def test_factored_init_has_the_scale_of_the_dense_init():
  """u @ v starts with the dense kernel's entry std (init_std x 0.88, the truncation)."""
  cfg = config_lib.for_scheme("ibug68", 19, hidden_size=256, recurrent_rank=64)
  fact = stage_net.init_stacked(jax.random.key(1), cfg)
  product = np.matmul(fact["recurrent"]["u"], fact["recurrent"]["v"])
  dense_std = cfg.init_std * _truncated_std()
  assert float(product.std()) == pytest.approx(dense_std, rel=0.05)
  assert float(fact["recurrent"]["u"].std()) == pytest.approx(
      cfg.recurrent_input_size ** -0.5 * _truncated_std(), rel=0.05)


def _truncated_std():
  z = np.random.default_rng(0).standard_normal(2_000_000)
  return float(z[np.abs(z) <= 2].std())


# --- forward ---------------------------------------------------------------------------------

def test_factored_forward_is_the_dense_forward_with_kernel_u_at_v(monkeypatch):
  monkeypatch.setattr(cascade, "TARGET_CHUNK_PATCHES", 13)   # several chunks per batch
  cfg = _cfg(RANK)
  params = _params(cfg)
  images, init = _inputs(cfg, 8)
  out = cascade.run_cascade_jit(params, images, init, cfg)
  ref = cascade.run_cascade_jit(_densified(params), images, init, SMALL)
  np.testing.assert_allclose(out.shapes, ref.shapes, atol=1e-3, rtol=1e-4)
  np.testing.assert_allclose(out.errors, ref.errors, atol=1e-4, rtol=1e-4)
  assert float(jnp.abs(out.shapes[-1] - init).max()) > 2       # the model moved them
  # The StageNet module (flax apply) on one stage gives the same step.
  layout, _ = cascade.stage_inputs(cfg)
  atlas = pyramid.build_atlas(images, layout)
  shape = cascade.broadcast_init(init, 8, cfg)
  hidden = jnp.zeros((8, cfg.hidden_size))
  p0, xs = cascade.stage_params(params, 0), cascade.stage_xs(cfg, 0)
  a = cascade.stage_step(cfg, p0, atlas, shape, hidden, xs)
  b = cascade.stage_forward(cfg, p0, atlas, shape, hidden, xs)
  for x, y in zip(a[:3], b[:3]):
    np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-4)
  # The fast early-exit path (threshold) equals the masked cascade.
  e = np.sort(np.asarray(out.errors[:-1]).ravel())
  ts = float(e[len(e) // 2] + e[len(e) // 2 + 1]) / 2
  masked = cascade.run_cascade_jit(params, images, init, cfg, ts)
  fast = fast_inference.FastCascade(params, cfg).run(images, init, ts)
  np.testing.assert_array_equal(fast.iterations, masked.iterations)
  np.testing.assert_allclose(fast.landmarks, masked.landmarks, atol=1e-4, rtol=1e-4)


def test_bf16_storage_and_compute_keep_the_factored_layer_working():
  cfg = _cfg(RANK)
  params = _params(cfg)
  images, init = _inputs(cfg, 4)
  stages = fast_inference.unstack_params(params, jnp.bfloat16)
  rec = stages[0]["recurrent"]
  assert (rec["u"].dtype, rec["v"].dtype, rec["bias"].dtype) == (
      jnp.bfloat16, jnp.bfloat16, jnp.float32)
  assert stages[0]["head"]["kernel"].dtype == jnp.bfloat16
  ref = fast_inference.FastCascade(params, cfg).run(images, init)
  b16 = fast_inference.FastCascade(params, cfg, weight_dtype=jnp.bfloat16).run(images, init)
  np.testing.assert_allclose(b16.landmarks, ref.landmarks, atol=0.3)
  assert float(jnp.abs(b16.landmarks - ref.landmarks).max()) > 0    # really bf16
  bf = cascade.run_cascade_jit(params, images, init, _cfg(RANK, compute_dtype="bfloat16"))
  np.testing.assert_allclose(bf.landmarks, ref.landmarks, atol=0.3)


# --- cost --------------------------------------------------------------------------------------

def test_macs_and_parameters_count_the_factors():
  cfg = config_lib.for_scheme("ibug68", 19, recurrent_rank=8, levels=(0,))
  dense = config_lib.for_scheme("ibug68", 19, levels=(0,))
  n_in, h = 19 * 256 + 512, 512
  assert cost.stage_macs(cfg)["recurrent"] == 8 * n_in + 8 * h
  assert cost.stage_macs(dense)["recurrent"] == n_in * h
  assert cost.parameter_count(dense) - cost.parameter_count(cfg) == n_in * h - 8 * (n_in + h)
  # The tree's size and XLA's count: test_ablation_options.py
  # test_macs_and_parameters_count_the_options[conv-none-8].


def test_macs_table_has_the_factored_rows():
  from experiments import macs  # noqa: PLC0415
  rows = macs.table()
  r = rows["68/34 recurrent rank 128"]
  assert r["recurrent_rank"] == 128 and rows["68/34"]["recurrent_rank"] == 0
  assert r["mparams"] < 0.3 * rows["68/34"]["mparams"]
  assert r["mmacs"] < rows["68/34"]["mmacs"]


# --- save, load, export, predictor ---------------------------------------------------------------

def test_save_load_export_and_predictor_of_a_factored_model(tmp_path):
  cfg = _cfg(RANK)
  params = _params(cfg)
  mean = np.random.default_rng(2).uniform(16, 48, (10, 2)).astype(np.float32)
  model_io.save_model(tmp_path / "f32", params, cfg, mean, {"name": "t"})
  info = json.loads((tmp_path / "f32" / model_io.CONFIG_FILE).read_text())
  assert info["model_config"]["recurrent_rank"] == RANK
  assert set(info["param_shapes"]) >= {"recurrent/u", "recurrent/v", "recurrent/bias"}
  m = model_io.load_model(tmp_path / "f32")
  assert m.model_config == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(m.params)):
    np.testing.assert_array_equal(a, b)
  # bf16 storage (as shipped), the predictor and the portable program agree.
  model_io.save_model(tmp_path / "bf16", params, cfg, mean, {}, dtype="bfloat16")
  pred = predictor_lib.Predictor.from_model_dir(tmp_path / "bf16", max_batch=4)
  assert pred.model_config.recurrent_rank == RANK
  assert portable.weight_dtype(pred.params) == "bfloat16"
  crops = np.random.default_rng(3).normal(size=(3, 64, 64, 3)).astype(np.float32)
  exp = jax.export.deserialize(portable.export_stablehlo(pred.params, cfg, pred.mean_shape))
  lm, err = exp.call(crops)
  ref = pred.run_fast(crops)
  np.testing.assert_allclose(np.asarray(lm), ref["landmarks"], atol=1e-4)
  np.testing.assert_allclose(np.asarray(err), ref["estimated_error"], atol=1e-5)
  assert np.abs(np.asarray(lm) - mean).max() > 1e-2
  # A factored file does not load as a dense model, nor the reverse.
  with pytest.raises(ValueError, match="recurrent"):
    model_io.check_params(params, SMALL)


# --- the SVD conversion ------------------------------------------------------------------------

def test_truncated_svd_is_balanced_and_reports_its_error():
  rng = np.random.default_rng(0)
  low = rng.normal(size=(2, 40, 5)) @ rng.normal(size=(2, 5, 12))        # rank 5
  u, v, rel = factorise.truncated_svd(low, 5)
  assert u.dtype == v.dtype == np.float32 and u.shape == (2, 40, 5) and v.shape == (2, 5, 12)
  np.testing.assert_allclose(u @ v, low, atol=1e-4)
  np.testing.assert_allclose(rel, 0, atol=1e-6)
  for i in range(2):                        # balanced: u^T u = v v^T = diag(s)
    np.testing.assert_allclose(u[i].T @ u[i], v[i] @ v[i].T, rtol=1e-4, atol=1e-3)
  k = rng.normal(size=(30, 10))
  u, v, rel = factorise.truncated_svd(k, 3)
  s = np.linalg.svd(k, compute_uv=False)
  assert float(rel) == pytest.approx(np.linalg.norm(k - u @ v) / np.linalg.norm(k), rel=1e-5)
  assert float(rel) == pytest.approx(np.sqrt((s[3:] ** 2).sum() / (s ** 2).sum()), rel=1e-6)
  with pytest.raises(ValueError, match="rank"):
    factorise.truncated_svd(k, 11)


def test_full_rank_svd_reproduces_the_dense_model():
  params = _params(SMALL, seed=3)
  images, init = _inputs(SMALL, 4)
  top = _cfg(SMALL.hidden_size)                       # rank = min(in, out): exact
  conv, info = factorise.convert_params(params, SMALL, top)
  assert info["recurrent"] == "factorised" and max(info["relative_error"]) < 1e-6
  for name in params:
    if name != "recurrent":
      for a, b in zip(jax.tree.leaves(params[name]), jax.tree.leaves(conv[name])):
        np.testing.assert_array_equal(a, b)
  ref = cascade.run_cascade_jit(params, images, init, SMALL)
  out = cascade.run_cascade_jit(conv, images, init, top)
  np.testing.assert_allclose(out.shapes, ref.shapes, atol=1e-3)
  np.testing.assert_allclose(out.errors, ref.errors, atol=1e-4)
  # A lower rank approximates; densifying a factored model is exact; same rank copies.
  low, info = factorise.convert_params(params, SMALL, _cfg(RANK))
  assert 0 < min(info["relative_error"])
  back, info = factorise.convert_params(low, _cfg(RANK), SMALL)
  assert info["recurrent"] == "densified"
  np.testing.assert_allclose(back["recurrent"]["kernel"],
                             low["recurrent"]["u"] @ low["recurrent"]["v"], rtol=1e-5, atol=1e-7)
  same, info = factorise.convert_params(low, _cfg(RANK), _cfg(RANK))
  assert info["recurrent"] == "copied"
  np.testing.assert_array_equal(same["recurrent"]["u"], low["recurrent"]["u"])


@pytest.mark.parametrize("source_rank,target_rank", [(0, 0), (RANK, RANK), (0, RANK)])
def test_a_grown_patch_set_computes_the_source_model(source_rank, target_rank):
  """MuSiCa34 -> MuSiCa68 style: the target's patches include the source's (in another
  order, with new ones between): the converted model gives the source's landmarks and
  errors (new patches: zero recurrent rows), and the new rows are where they belong."""
  src_cfg = _cfg(source_rank)
  params = _params(src_cfg, seed=5)
  tgt_cfg = _cfg(target_rank, patch_indices=(9, 0, 1, 2, 3, 4, 6, 7, 8))
  grown, info = factorise.convert_params(params, src_cfg, tgt_cfg)
  assert info["new_patches"] == [1, 3, 7]
  images, init = _inputs(src_cfg, 3)
  ref = cascade.run_cascade_jit(params, images, init, src_cfg)
  out = cascade.run_cascade_jit(grown, images, init, tgt_cfg)
  tol = 1e-3 if source_rank == target_rank else 0.5     # an SVD approximates
  np.testing.assert_allclose(out.shapes, ref.shapes, atol=tol)
  if source_rank == target_rank:
    np.testing.assert_allclose(out.errors, ref.errors, atol=1e-4)
  name = "kernel" if target_rank == 0 else "u"
  d = src_cfg.descriptor_size
  w = np.asarray(grown["recurrent"][name])
  for j in (2, 4, 7):                                   # landmarks 1, 3, 7: new patches
    assert not w[:, j * d:(j + 1) * d].any()
  assert w[:, 0:d].any() and w[:, -tgt_cfg.hidden_size:].any()
  with pytest.raises(ValueError, match="patch_indices"):  # dropping one and adding one: refused
    factorise.convert_params(params, src_cfg, _cfg(target_rank, patch_indices=(0, 2, 4, 6, 8, 1)))


@pytest.mark.parametrize("rank", [0, RANK])
def test_a_shrunk_patch_set_keeps_the_kept_patches_rows(rank):
  """MuSiCa68 -> MuSiCa34 style: shrinking a grown model back to its source's patches gives
  the source's parameters exactly; shrinking a trained one drops the other patches' rows
  (recorded), keeps every kept patch's rows and the hidden state's."""
  src_cfg = _cfg(rank)
  params = _params(src_cfg, seed=7)
  big_cfg = _cfg(rank, patch_indices=(9, 0, 1, 2, 3, 4, 6, 7, 8))
  grown, _ = factorise.convert_params(params, src_cfg, big_cfg)
  back, info = factorise.convert_params(grown, big_cfg, src_cfg)
  assert info["dropped_patches"] == [1, 3, 7] and "new_patches" not in info
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), b)
  trained = _params(big_cfg, seed=8)
  small_cfg = _cfg(rank, patch_indices=(8, 0, 3))
  small, info = factorise.convert_params(trained, big_cfg, small_cfg)
  assert info["dropped_patches"] == [9, 1, 2, 4, 6, 7]
  name = "kernel" if rank == 0 else "u"
  d, h = src_cfg.descriptor_size, src_cfg.hidden_size
  w, w_small = np.asarray(trained["recurrent"][name]), small["recurrent"][name]
  assert w_small.shape[1] == 3 * d + h
  for j, pos in enumerate((8, 1, 4)):        # landmarks 8, 0, 3 in the 9-patch order
    np.testing.assert_array_equal(w_small[:, j * d:(j + 1) * d], w[:, pos * d:(pos + 1) * d])
  np.testing.assert_array_equal(w_small[:, -h:], w[:, -h:])


def test_conversion_refuses_another_model():
  params = _params(SMALL)
  with pytest.raises(ValueError, match=r"in hidden_size \(source 64, new 32\)"):
    factorise.convert_params(params, SMALL, _cfg(RANK, hidden_size=32))
  with pytest.raises(ValueError, match=r"in num_patches \(source 6, new 3\)"):
    factorise.convert_params(params, SMALL, _cfg(RANK, patch_indices=(0, 1, 2)))
  with pytest.raises(ValueError, match="levels"):       # fewer iterations: refused
    factorise.convert_params(params, SMALL, _cfg(0, levels=(1,)))


def test_other_levels_keep_every_parameter_and_read_the_new_level():
  """As many iterations reading other pyramid levels (the dial's (2, 1, 0) -> (2, 0, 0)):
  every parameter is copied, the record names the levels, and the converted model is the
  source's weights run on the new levels (not the source's landmarks)."""
  params = _params(SMALL, seed=3)
  new_cfg = _cfg(0, levels=tuple(reversed(SMALL.levels)))
  conv, info = factorise.convert_params(params, SMALL, new_cfg)
  assert info["levels"] == {"source": list(SMALL.levels), "new": list(new_cfg.levels)}
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(conv)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), b)
  images, init = _inputs(SMALL, 2)
  ref = cascade.run_cascade_jit(params, images, init, SMALL)
  out = cascade.run_cascade_jit(conv, images, init, new_cfg)
  assert not np.allclose(out.shapes, ref.shapes, atol=1e-4)


# --- training ----------------------------------------------------------------------------------

# Training a factored model from scratch: tests/test_ablation_options.py
# test_training_reduces_the_loss[conv-none-16].


@pytest.fixture(scope="module")
def tiny_flags(tiny_two_level_flags):
  """A tiny synthetic run (conftest: data prepared once per session)."""
  return tiny_two_level_flags


def _config(parse_flags, args, workdir):
  parse_flags(f"--workdir={workdir}", *args)
  return train.config_from_flags()


def _first_loss(workdir):
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    rec = json.loads(line)
    if rec["step"] == 1 and "train/loss" in rec:
      return rec["train/loss"]
  raise AssertionError("no step-1 loss logged")


def _loss(params, cfg, data_cfg, mean_shape):
  """The training loss of `params` on the run's first batch (as train_step computes it)."""
  from data_pipelines import input_pipeline  # noqa: PLC0415
  batch = next(input_pipeline.train_iterator(data_cfg, start_step=0))
  batch = {k: jnp.asarray(v) for k, v in batch.items() if np.asarray(v).dtype.kind in "biuf"}
  scheme = schemes.get_scheme(cfg.num_landmarks)

  @jax.jit
  def loss(p):
    out = cascade.run_cascade(p, batch["image"], jnp.asarray(mean_shape), cfg)
    mask = batch.get("mask")
    return losses.cascade_loss(out.shapes, out.errors, batch["landmarks"],
                               scheme.outer_eye_corners,
                               None if mask is None else mask.astype(jnp.float32))[0]
  return float(loss(params))


def test_init_from_a_saved_model_factorises_it_and_resume_ignores_it(
    tmp_path, tiny_flags, parse_flags, capsys):
  dense_cfg = _config(parse_flags, tiny_flags, tmp_path / "unused").model
  assert dense_cfg.recurrent_rank == 0 and dense_cfg.hidden_size == 32
  src = _params(dense_cfg, seed=4)
  model_io.save_model(tmp_path / "src", src, dense_cfg,
                      np.full((68, 2), 110.0, np.float32), {"name": "source"})

  # A factored run at full rank (min(19*256 + 32, 32) = 32) from the dense source: its
  # first step's loss is the source model's on that batch.
  work = tmp_path / "w"
  config = _config(parse_flags, [*tiny_flags, f"--init_from={tmp_path / 'src'}",
                                 "--recurrent_rank=32", "--steps=2"], work)
  assert config.train.init_from == str(tmp_path / "src")
  train_lib.train_and_evaluate(config, str(work))
  out = capsys.readouterr().out
  assert "initialised from" in out and "factorised at rank 32" in out
  run = run_config.load(work)
  assert run["train"]["init_from"] == str(tmp_path / "src")
  rec = run["init_from"]
  assert rec["recurrent"] == "factorised" and rec["recurrent_rank"] == 32
  assert rec["source_recurrent_rank"] == 0 and max(rec["relative_error"]) < 1e-6
  assert rec["path"] == str((tmp_path / "src").resolve()) and rec["param_dtype"] == "float32"
  # The run's initial shape is its data's mean shape, not the source's.
  assert rec["mean_shape_max_shift_px"] > 0
  assert not np.allclose(run["mean_shape"], 110.0)
  expected = _loss(src, dense_cfg, config.data, run["mean_shape"])
  assert _first_loss(work) == pytest.approx(expected, rel=1e-4)
  # ... and not what a random initialisation gives.
  fresh = jax.tree.map(np.asarray, stage_net.init_stacked(jax.random.key(0), dense_cfg))
  assert abs(_loss(fresh, dense_cfg, config.data, run["mean_shape"]) - expected) > 1e-3 * expected

  # The EMA starts from the source too (two steps later it is still next to it).
  step2 = restore.restore_state(work)[0]
  assert np.abs(np.asarray(step2.ema_params["head"]["bias"]) - src["head"]["bias"]).max() < 0.05
  assert np.abs(src["head"]["bias"]).max() > 1

  # Resuming ignores --init_from (even one that does not exist) and keeps the record.
  train_lib.train_and_evaluate(
      _config(parse_flags, [*tiny_flags, "--init_from=/nonexistent", "--recurrent_rank=32",
                            "--steps=3"], work), str(work))
  out = capsys.readouterr().out
  assert "resumed from checkpoint at step 2" in out and "--init_from=/nonexistent ignored" in out
  run = run_config.load(work)
  assert run["train"]["init_from"] == str(tmp_path / "src") and run["init_from"] == rec
  state, _, _ = restore.restore_state(work)
  assert int(state.step) == 3
  assert not np.array_equal(state.params["recurrent"]["u"], step2.params["recurrent"]["u"])


def test_init_from_refuses_a_different_model_in_one_line(tmp_path, tiny_flags, parse_flags):
  dense_cfg = _config(parse_flags, tiny_flags, tmp_path / "unused").model
  model_io.save_model(tmp_path / "src", _params(dense_cfg), dense_cfg,
                      np.full((68, 2), 110.0, np.float32))
  work = tmp_path / "w"
  with pytest.raises(common.UserError, match=r"^--init_from=.*src: the model config differs "
                     r"from the source model's in num_patches \(source 19, new 34\)"):
    train_lib.train_and_evaluate(_config(parse_flags, [
        *tiny_flags, f"--init_from={tmp_path / 'src'}", "--num_patches=34", "--steps=2"],
        work), str(work))
  assert not work.exists()                 # a run that fails before its first step
  with pytest.raises(common.UserError, match="--init_from=.*missing"):
    train_lib.train_and_evaluate(_config(parse_flags, [
        *tiny_flags, f"--init_from={tmp_path / 'missing'}", "--steps=2"], work), str(work))
