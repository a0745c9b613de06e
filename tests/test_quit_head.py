"""The quitting policy: targets, fitting, storage, and budget -> capacities / threshold."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import estimate_calibration
from experiments import quit_head_fit
from musica_jax import budget as budget_lib
from musica_jax import config as config_lib
from musica_jax import cost
from musica_jax import quit_head

CFG = config_lib.ModelConfig(num_landmarks=10, patch_indices=(0, 2, 4, 6, 8, 9),
                             hidden_size=16, image_size=64)
INFO = {"profile": [[1.0, 0.0, 0.0], [1.5, 0.45, 0.05], [2.0, 0.8, 0.2], [2.5, 0.95, 0.55],
                    [3.0, 1.0, 1.0]],
        "thresholds": [[0.20, 1.0], [0.08, 1.5], [0.05, 2.0], [0.03, 2.5], [0.0, 3.0]]}


def test_targets_by_hand():
  nme = np.array([[0.10, 0.05], [0.06, 0.045], [0.05, 0.046]])
  np.testing.assert_allclose(quit_head_fit.targets(nme, "gain"),
                             [[0.04, 0.005], [0.01, -0.001], [0.0, 0.0]], atol=1e-12)
  np.testing.assert_allclose(quit_head_fit.targets(nme, "error"), np.log(nme))


def test_features_and_step_length():
  a = jnp.zeros((2, 10, 2))
  b = a.at[:, :, 0].set(14.2)            # every landmark moved 0.1 box sides
  np.testing.assert_allclose(quit_head.step_length(b, a), [0.1, 0.1], rtol=1e-6)
  f = quit_head.features(jnp.ones((2, 16)), jnp.array([0.05, 0.0]), jnp.array([0.1, 0.2]))
  assert f.shape == (2, 19)
  np.testing.assert_allclose(f[:, 16], [0.05, 0.0])
  np.testing.assert_allclose(f[:, 17], np.log([0.05, 1e-4]), rtol=1e-6)   # clamped log


@pytest.mark.parametrize("kind,loss", [("gain", "huber"), ("gain", "rank"), ("error", "l2")])
def test_fit_learns_a_planted_relation(kind, loss):
  rng = np.random.default_rng(0)
  s, f, d = 3, 1500, 19
  feats = rng.normal(size=(s, f, d)).astype(np.float32)
  # True errors: decreasing over iterations, the gain of the next iteration grows with
  # feature 0 of that iteration (the relation a gain head must find).
  nme = np.empty((s, f))
  nme[0] = 0.08 + 0.01 * rng.random(f)
  for i in range(s - 1):
    gain = 0.01 * (1 + np.tanh(feats[i, :, 0]))
    nme[i + 1] = nme[i] - gain
  if kind == "error":   # the current error itself follows feature 0
    nme = 0.05 * np.exp(0.3 * feats[:, :, 0])
  head = quit_head_fit.fit(feats, nme, quit_head_fit.FitConfig(kind=kind, loss=loss, steps=400,
                                                       hidden_units=16))
  assert head["w1"].shape == (s, d, 16)
  scores = quit_head_fit.scores_numpy(head, feats)
  target = quit_head_fit.targets(nme, kind)
  for i in range(s - 1 if kind == "gain" else s):
    assert estimate_calibration.spearman(scores[i], target[i]) > 0.9
  # Deterministic for a seed.
  again = quit_head_fit.fit(feats, nme, quit_head_fit.FitConfig(kind=kind, loss=loss, steps=400,
                                                        hidden_units=16))
  np.testing.assert_array_equal(again["w1"], head["w1"])


def test_fit_config_rejects_unknown_kinds():
  with pytest.raises(ValueError, match="kind"):
    quit_head_fit.FitConfig(kind="speed")
  with pytest.raises(ValueError, match="loss"):
    quit_head_fit.FitConfig(loss="l3")


def test_save_and_load(tmp_path):
  s, d, u = CFG.num_stages, CFG.hidden_size + 3, 4
  head = dict(w1=np.ones((s, d, u)), b1=np.zeros((s, u)), w2=np.ones((s, u)), b2=np.zeros(s),
              mean=np.zeros((s, d)), std=np.ones((s, d)), exp_output=np.zeros(s))
  quit_head.save(tmp_path, head, {"design": "gain_head", "kind": "gain", **INFO})
  params, info = quit_head.load(tmp_path, s, CFG.hidden_size)
  np.testing.assert_array_equal(params["w1"], head["w1"])
  assert info["design"] == "gain_head" and info["format"] == quit_head.FORMAT
  with pytest.raises(ValueError, match="w1 has shape"):
    quit_head.load(tmp_path, s, CFG.hidden_size + 1)       # another model's head
  # The paper's rule: no parameters, the profile alone (and the npz is removed).
  quit_head.save(tmp_path, None, {"design": "E", "kind": "estimated_error", **INFO})
  params, info = quit_head.load(tmp_path, s, CFG.hidden_size)
  assert params is None and info["kind"] == "estimated_error"
  assert not (tmp_path / quit_head.PARAMS_FILE).exists()
  (tmp_path / quit_head.INFO_FILE).write_text(json.dumps({"format": quit_head.FORMAT}))
  with pytest.raises(ValueError, match="profile"):
    quit_head.load(tmp_path, s, CFG.hidden_size)
  assert quit_head.load(tmp_path / "nothing", s, CFG.hidden_size) is None


@pytest.mark.parametrize("batch", [1, 5, 64, 100])
def test_budget_capacities_are_exact_and_nested(batch):
  for budget in np.linspace(1.0, 3.0, 17):
    caps = budget_lib.budget_capacities(INFO, float(budget), batch)
    assert sum(caps) == round((budget - 1.0) * batch)
    assert batch >= caps[0] >= caps[1] >= 0
  # The split follows the profile: at 2 mean iterations 0.8 / 0.2 of the faces.
  assert budget_lib.budget_capacities(INFO, 2.0, 100) == (80, 20)
  with pytest.raises(ValueError, match="budget"):
    budget_lib.budget_capacities(INFO, 3.5, batch)


def _stream_iterations(threshold, scores):
  """A stand-in cascade: a face runs its next iteration while its score is >= the
  threshold (scores [faces, 2]: after iterations 1 and 2)."""
  go1 = scores[:, 0] >= threshold
  return 1 + go1 + (go1 & (scores[:, 1] >= threshold))


@pytest.mark.parametrize("budget", [1.5, 2.0, 2.5])
def test_budget_stream_meets_the_budget_on_easier_faces(budget):
  rng = np.random.default_rng(0)
  # Scores of faces like INFO's validation faces would give about its table; these are
  # 3x easier (lower scores), so the table's threshold alone under-spends the budget.
  scores = rng.exponential(0.05, (3000, 2)) / 3
  open_loop = _stream_iterations(budget_lib.threshold_for_budget(INFO, budget), scores)
  assert open_loop.mean() < budget - 0.3
  stream = budget_lib.BudgetStream(INFO, budget, 3)
  its = []
  for face in scores:
    target = stream.target()
    its.append(int(_stream_iterations(stream.threshold(target), face[None])[0]))
    stream.record(its[-1], target)
  assert stream.faces == 3000
  assert abs(stream.mean_iterations - budget) < 0.02
  assert abs(np.mean(its[:64]) - budget) < 0.05        # it learns the shift within ~16 faces
  with pytest.raises(ValueError, match="budget"):
    budget_lib.BudgetStream(INFO, 3.5, 3)


def test_threshold_for_budget_and_budget_iterations():
  assert budget_lib.threshold_for_budget(INFO, 2.0) == pytest.approx(0.05)
  assert budget_lib.threshold_for_budget(INFO, 2.25) == pytest.approx(0.04)
  # A fitted table starts with [null, S] (at the full budget no face quits): a number, never
  # NaN, at and near the top (a 2-iteration model's "Ts for budget 2" used to be NaN).
  fitted = {**INFO, "thresholds": [[None, 3.0], [0.001, 2.999]] + INFO["thresholds"][:-1]}
  assert budget_lib.threshold_for_budget(fitted, 3.0) == -np.inf
  assert budget_lib.threshold_for_budget(fitted, 2.9995) == -np.inf
  assert budget_lib.threshold_for_budget(fitted, 2.999) == pytest.approx(0.001)
  assert budget_lib.threshold_for_budget(fitted, 2.0) == pytest.approx(0.05)
  per_it = 1e-6 * cost.cascade_macs(CFG, 1)
  assert budget_lib.budget_iterations(CFG, INFO, budget_mmacs=2 * per_it) == pytest.approx(2.0)
  assert budget_lib.budget_iterations(CFG, INFO) is None
  with pytest.raises(ValueError, match="between 1 and 3"):
    budget_lib.budget_iterations(CFG, INFO, 0.5)
  with pytest.raises(ValueError, match="not both"):
    budget_lib.budget_iterations(CFG, INFO, 2.0, 5.0)
  with pytest.raises(ValueError, match="no quitting profile"):
    budget_lib.budget_iterations(CFG, None, 2.0)
