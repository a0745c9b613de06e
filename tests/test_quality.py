"""The per-face quality score (issue #28 item 4): experiments.quality_features' features on
tiny synthetic shapes, the score's monotonicity; experiments.quality_score_lib's fit and
honest measure on synthetic numbers; a tiny end-to-end run on real val faces (skips without
the data)."""
import json

import numpy as np
import pytest

from data_pipelines import shape_stats
from experiments import quality_features as quality

# A symmetric 8-point "face": 4 left/right pairs mirrored across x = 0.
HALF = np.array([[1.0, 0.0], [0.5, 1.0], [0.7, -1.0], [0.2, 0.4]])
MEAN = np.concatenate([HALF * [-1, 1], HALF])           # points 0-3 left, 4-7 right
PERM = [4, 5, 6, 7, 0, 1, 2, 3]


def _rotation(deg):
  t = np.radians(deg)
  return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def _shape_model(k=4):
  rng = np.random.default_rng(0)
  shapes = []
  for _ in range(200):
    s = MEAN + rng.normal(0, 0.03, MEAN.shape)
    shapes.append((s @ _rotation(rng.uniform(-10, 10)).T) * rng.uniform(50, 80)
                  + rng.uniform(50, 150, 2))
  sm = shape_stats.fit_shape_model(np.stack(shapes), k)
  init = MEAN * 60 + 114           # the model's mean shape in "crop pixels"
  return quality.shape_model_from_training(sm.mean, sm.components, sm.variances, PERM, init)


def _doc(shape_model, weights=None, t_fail=0.1):
  n = len(quality.FEATURES)
  w = [0.2, 0.1, 0.02, 0.05, 0.04, 0.04, -0.05, 0.0, -0.05] if weights is None else weights
  return {"kind": "log_nme_linear", "features": list(quality.FEATURES), "mean": [0.0] * n,
          "std": [1.0] * n, "weights": list(w), "bias": -3.0, "t_fail": t_fail,
          "shape_model": shape_model}


def test_align_is_the_training_side_procrustes():
  rng = np.random.default_rng(1)
  shapes = rng.normal(0, 1, (5, 8, 2))
  ref = MEAN / np.linalg.norm(MEAN - MEAN.mean(0))
  aligned, _, _ = quality.align(shapes, ref)
  np.testing.assert_allclose(aligned, shape_stats.align_to(shapes, ref), atol=1e-10)


def test_the_mean_shape_has_no_residual_and_a_scrambled_one_scores_worse():
  sm = _shape_model()
  # The mean shape anywhere, at any size and roll: ~zero Mahalanobis distance, residual
  # and asymmetry; the roll and size read back.
  mean = np.asarray(sm["mean"])                 # the training shapes' aligned mean
  size = np.linalg.norm(mean) / np.linalg.norm(MEAN - MEAN.mean(0))
  placed = (mean @ _rotation(30).T) * 3 * 60 / size + [100, 120]
  f = quality.shape_features(placed[None], sm)
  assert np.exp(f["log_mahalanobis"][0]) < 1e-5
  assert np.exp(f["log_residual"][0]) < 1e-5
  assert np.exp(f["log_asymmetry"][0]) < 0.02     # the sampled mean is nearly symmetric
  assert f["abs_roll_deg"][0] == pytest.approx(30, abs=2)
  assert f["log_size"][0] == pytest.approx(np.log(3), abs=1e-6)
  centre = (MEAN * 60 + 114).mean(0)            # the model's mean shape's centre
  assert f["shift"][0] == pytest.approx(np.hypot(*([100, 120] - centre)) / 142, abs=1e-9)
  # Scrambled (left and right points swapped in place but not mirrored, two points moved):
  # much further from the training shapes, and asymmetric.
  scrambled = placed.copy()
  scrambled[[0, 1]] = scrambled[[1, 0]]
  scrambled[6] += [40, -30]
  g = quality.shape_features(scrambled[None], sm)
  for k in ("log_mahalanobis", "log_residual", "log_asymmetry"):
    assert g[k][0] > f[k][0] + 3, k


def test_step_length_is_the_quit_heads():
  import jax.numpy as jnp  # noqa: PLC0415
  from musica_jax import quit_head  # noqa: PLC0415
  rng = np.random.default_rng(2)
  a, b = rng.normal(100, 10, (3, 8, 2)), rng.normal(100, 10, (3, 8, 2))
  np.testing.assert_allclose(quality.step_length(a, b),
                             np.asarray(quit_head.step_length(jnp.asarray(a), jnp.asarray(b))),
                             rtol=1e-5)


def test_the_score_rises_with_the_estimated_error_and_is_its_regression_at_the_mean():
  sm = _shape_model()
  doc = _doc(sm)
  lm = np.broadcast_to(MEAN * 60 + 114, (50, 8, 2))
  e = np.linspace(0.01, 0.5, 50)
  s = quality.score(doc, lm, e, np.full(50, 0.05), np.full(50, 0.001))
  assert np.all(np.diff(s) > 0)                  # weight on log_error > 0: monotone in E
  s_prev = quality.score(doc, lm, np.full(50, 0.05), e, np.full(50, 0.001))
  assert np.all(np.diff(s_prev) > 0)
  s_step = quality.score(doc, lm, np.full(50, 0.05), np.full(50, 0.05), e / 10)
  assert np.all(np.diff(s_step) > 0)
  # exp of the linear model: the bias at features equal to their means.
  feats = quality.features(sm, lm[:1], [0.05], [0.05], [0.001])
  zero = {**doc, "mean": [float(feats[k][0]) for k in quality.FEATURES]}
  assert quality.score(zero, lm[:1], [0.05], [0.05], [0.001])[0] == pytest.approx(np.exp(-3.0))
  # One iteration only (no previous E): E stands in; a non-finite E scores inf (flagged).
  one = quality.score(doc, lm[:2], [0.05, np.nan], [np.inf, 0.05], [0.001, 0.001])
  assert one[0] == pytest.approx(quality.score(doc, lm[:1], [0.05], [0.05], [0.001])[0])
  assert one[1] == np.inf and quality.flagged(doc, one).tolist() == [False, True]


# ---------------------------------------------------------------------------------------
# experiments.quality_score_lib on synthetic numbers (fast, no model).


def _synthetic(seed=0):
  """E reads the true NME times a per-condition bias that a feature (x2) reveals: E alone
  cannot meet a per-condition target, E corrected by x2 can."""
  rng = np.random.default_rng(seed)
  cond, nme, e, x2, ids = [], [], [], [], []
  for c, bias in (("clean", 1.0), ("tilted", 1.8), ("hidden", 0.6)):
    for i in range(300):
      n = np.exp(rng.normal(np.log(0.05), 0.45))
      cond.append(c)
      nme.append(n)
      e.append(n * bias * np.exp(rng.normal(0, 0.08)))
      x2.append(np.log(bias) + rng.normal(0, 0.02))
      ids.append(f"helen/{i}_1" if c == "clean" else f"helen/{i}_1#x" if c == "tilted"
                 else f"helen/{i}_1")
  e = np.array(e)
  x = np.stack([np.log(e), np.array(x2)], 1)
  return x, e, np.array(nme), np.array(cond), ids


def test_fit_linear_recovers_a_linear_log_error():
  from experiments import quality_score_lib as lib  # noqa: PLC0415
  rng = np.random.default_rng(3)
  x = rng.normal(0, 1, (500, 3))
  nme = np.exp(-3 + 0.5 * x[:, 0] - 0.2 * x[:, 2])
  fit = lib.fit_linear(x, nme, ridge=0.0)
  w = np.array(fit["weights"]) / np.array(fit["std"])
  np.testing.assert_allclose(w, [0.5, 0.0, -0.2], atol=1e-9)
  np.testing.assert_allclose(lib.predict_linear(fit, x), nme, rtol=1e-9)
  x[0, 1] = np.nan
  assert lib.predict_linear(fit, x)[0] == np.inf


def test_photo_folds_are_robust_vals_and_keep_a_photo_together():
  from experiments import quality_score_lib as lib  # noqa: PLC0415
  from experiments import robust_val_lib  # noqa: PLC0415
  ids = [f"afw/{p}_{k}" for p in range(40) for k in (1, 2)] + ["helen/7_1#mirror"]
  f2 = lib.photo_folds(ids, 2)
  assert f2.tolist() == [robust_val_lib._fold_of(i) for i in ids]  # noqa: SLF001
  f5 = lib.photo_folds(ids, 5)
  assert set(f5.tolist()) == set(range(5))
  for f in (f2, f5):
    assert np.all(f[0:80:2] == f[1:80:2])          # the faces of one photo share a fold
  assert lib.photo_folds(["helen/7_1#mirror", "helen/7_1"], 3).tolist()[0] == \
      lib.photo_folds(["helen/7_1"], 3)[0]


def test_cross_fit_beats_e_where_a_feature_explains_its_bias_and_reproduces_the_baseline():
  from experiments import quality_score_lib as lib  # noqa: PLC0415
  from experiments import robust_val_lib  # noqa: PLC0415
  x, e, nme, cond, ids = _synthetic()
  names = ["clean", "tilted", "hidden"]
  fold = lib.photo_folds(ids, 2)
  q = dict(fail_nme=0.10, min_flagged=0.5, max_false_alarms=0.02)
  res = lib.cross_fit(x, e, nme, cond, fold, names, ridge=1.0, **q)
  assert res["score"]["meets_target"]["every_condition"]
  assert not res["estimated_error"]["meets_target"]["every_condition"]
  assert np.all(np.isfinite(res["held_out_scores"]))
  # E alone, held out: exactly robust_val_lib's 2-fold cross-validation.
  want = robust_val_lib.cross_validated(e, nme, cond, ids, names, 0.10, 0.5, 0.02)
  assert res["estimated_error"]["table"] == want["held_out_table"]
  assert [p["t_fail_estimated_error"] for p in res["per_fold"]] == want["t_fail_per_fold"]
  loco = lib.leave_one_condition_out(x, e, nme, cond, fold, names, ridge=1.0, **q)
  assert set(loco["score"]["table"]) == set(names) | {"all"}
  assert loco["score"]["table"]["all"]["faces"] == len(nme)


def test_entry_point_on_a_few_val_faces_fits_and_reports(shared_data, tfds_dir, tmp_path,
                                                         parse_flags):
  from experiments import config_flags, quality_score, quality_score_lib  # noqa: PLC0415
  quality_score.define_flags()
  out, cache = tmp_path / "q.json", tmp_path / "features.npz"
  parse_flags("--flagfile=300w34.flags", f"--data_dir={shared_data / '300w'}",
              f"--tfds_dir={tfds_dir}", "--model=default", "--max_faces=8",
              "--conditions=clean,rotate_40,occlusion_25", f"--output_json={out}",
              f"--features_cache={cache}")
  cfg = quality_score.config_from_flags()
  quality_score_lib.run(cfg, config_flags.data_config_from_flags(), "test")
  saved = json.loads(out.read_text())
  assert saved["faces"] == 24 and saved["conditions"] == ["clean", "rotate_40", "occlusion_25"]
  for part in ("held_out", "leave_one_condition_out"):
    for who in ("score", "estimated_error"):
      assert saved[part][who]["table"]["all"]["faces"] == 24
  assert cache.is_file()
  md = quality_score_lib.markdown_report(saved)
  assert "| occlusion_25 |" in md and "## Leave one condition out" in md
  # The cache is reused (same inputs, same numbers); a test split is refused.
  again = quality_score_lib.run(cfg, config_flags.data_config_from_flags(), "test")
  assert again["per_face"]["held_out_score"] == saved["per_face"]["held_out_score"]
  with pytest.raises(Exception, match="test split"):
    quality_score_lib.run(quality_score_lib.QualityScoreConfig(output_json=str(out),
                                                               split="common"),
                          config_flags.data_config_from_flags())
