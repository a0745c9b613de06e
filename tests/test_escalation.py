"""Escalation (`musica_jax.schedules`): after a cheap schedule's whole cascade, the faces
whose estimated error is high run the model's own full cascade too. The profile that
prices it, the choice that picks it for a budget, and what predict / evaluate do with it."""
import dataclasses

import numpy as np
import pytest

from experiments import eval_lib
from musica_jax import config as config_lib
from musica_jax import cost
from musica_jax import predictor as predictor_lib
from musica_jax import quit_head
from musica_jax import schedules
from tests.test_stage_patches import _policy, tiny_model_dir


def test_the_profile_prices_each_threshold():
  e = np.array([0.01, 0.02, 0.03, 0.04, np.nan])
  cheap = np.array([0.02, 0.03, 0.05, 0.09, 0.50])
  own = np.array([0.02, 0.02, 0.04, 0.05, 0.10])
  rows = schedules.escalation_profile(e, cheap, own, 20.0, 40.0, points=4)
  mmacs = [r[2] for r in rows]
  assert mmacs == sorted(mmacs)
  none = [r for r in rows if r[0] == np.inf][0]     # no finite estimate escalates; NaN does
  assert none[1] == pytest.approx(0.2) and none[2] == pytest.approx(28.0)
  assert none[3] == pytest.approx(np.mean(np.r_[cheap[:4], own[4]]))
  t03 = [r for r in rows if r[0] == pytest.approx(0.03)][0]   # 0.03, 0.04 and NaN escalate
  assert t03[1] == pytest.approx(0.6) and t03[2] == pytest.approx(20.0 + 0.6 * 40.0)
  assert t03[3] == pytest.approx(np.mean([0.02, 0.03, 0.04, 0.05, 0.10]))
  everyone = rows[-1]
  assert everyone[1] == 1.0 and everyone[3] == pytest.approx(own.mean())
  with pytest.raises(ValueError, match="equal-length"):
    schedules.escalation_profile(e, cheap[:3], own, 20.0, 40.0)


def _cands():
  full = config_lib.for_scheme(68, 34, recurrent_rank=128)
  cheap = dataclasses.replace(full, stage_patches=(9, 17, 34))
  m_full, m_cheap = cost.cascade_macs(full) / 1e6, cost.cascade_macs(cheap) / 1e6
  own = _policy(full, 0.036, 0.046)
  low = _policy(cheap, 0.039, 0.055)
  # Escalating 10% of the faces costs 0.1 m_full more and gives 0.037, 25% 0.0365: better
  # than the own dial there (~0.041, ~0.038); the own full cascade (0.036) is better still.
  low["escalation"] = [[None, 0.0, m_cheap, 0.039], [0.05, 0.1, m_cheap + 0.1 * m_full, 0.037],
                       [0.03, 0.25, m_cheap + 0.25 * m_full, 0.0365]]
  return [(full, own), (cheap, low)], m_full, m_cheap


def test_choose_escalates_where_that_beats_every_dial():
  cands, m_full, m_cheap = _cands()
  assert schedules.choose(cands, m_cheap) == (1, None, None)       # not affordable yet
  at = m_cheap + 0.1 * m_full
  assert schedules.choose(cands, at) == (1, None, 0.05)
  assert schedules.choose(cands, at, escalate=False) == (1, None, None)
  # With a quarter of the faces escalated affordable, the lowest NME within the budget wins.
  assert schedules.choose(cands, m_cheap + 0.3 * m_full) == (1, None, 0.03)
  # A budget is a cap: a point within 1% of the lowest affordable NME that costs less wins.
  low = dict(cands[1][1], escalation=cands[1][1]["escalation"] + [
      [0.02, 0.4, m_cheap + 0.4 * m_full, 0.0364]])
  nme, c = schedules._nme_at(cands[1][0], low, m_cheap + 0.4 * m_full)  # noqa: SLF001
  assert schedules.ESCALATION_TOLERANCE == 0.01
  assert (nme, c.escalate) == (0.0365, 0.03)
  # Above the own full cascade's cost it is the most accurate: no escalation.
  assert schedules.choose(cands, m_full + m_cheap) == (0, None, None)
  # The model's own schedule never escalates (to itself).
  cands[0][1]["escalation"] = cands[1][1]["escalation"]
  assert schedules.choose(cands[:1], m_full * 1.2) == (0, None, None)


def test_predict_escalates_exactly_the_faces_at_or_above_the_threshold(tmp_path):
  d, cfg, params, mean, cheap = tiny_model_dir(tmp_path)
  rng = np.random.default_rng(3)
  images = [rng.integers(0, 255, (96, 96, 3), dtype=np.uint8) for _ in range(2)]
  boxes = [[[20, 20, 70, 70], [25, 15, 75, 68], [10, 12, 80, 84]], [[18, 22, 66, 70]]]
  low = predictor_lib.Predictor(params, cheap, mean, max_batch=4).predict(images, boxes)
  full = predictor_lib.Predictor(params, cfg, mean, max_batch=4).predict(images, boxes)
  e = np.sort(low.estimated_error)
  assert e[0] < e[-1]
  t = float(0.5 * (e[1] + e[2]))                  # the two faces of highest estimate escalate
  m_full, m_cheap = cost.cascade_macs(cfg) / 1e6, cost.cascade_macs(cheap) / 1e6
  policy = _policy(cheap, 0.039, 0.055)
  budget = m_cheap + 0.25 * m_full                # below the own full cascade's cost
  policy["escalation"] = [[np.inf, 0.0, m_cheap, 0.039], [t, 0.25, budget, 0.030]]
  quit_head.save(d, None, _policy(cfg, 0.036, 0.046))
  quit_head.save(d, None, policy, schedules.suffix(cfg, cheap))
  p = predictor_lib.Predictor.from_model_dir(d, max_batch=4)
  got = p.predict(images, boxes, budget_mmacs=budget)
  up = low.estimated_error >= t
  assert up.sum() == 2
  np.testing.assert_allclose(got.landmarks[up], full.landmarks[up], atol=1e-3)
  np.testing.assert_allclose(got.landmarks[~up], low.landmarks[~up], atol=1e-3)
  np.testing.assert_allclose(got.estimated_error, np.where(up, full.estimated_error,
                                                           low.estimated_error), atol=1e-5)
  np.testing.assert_array_equal(got.iterations, np.where(up, 6, 3))
  np.testing.assert_array_equal(got.image_index, low.image_index)
  np.testing.assert_allclose(got.boxes, low.boxes)
  # A stream keeps its budget exactly: no escalation (here the own dial serves it).
  s = p.stream(budget_mmacs=budget)
  assert s.predictor is p and s.budget < 3
  assert s.predict(images, boxes).iterations.max() <= 3


def test_evaluate_merges_the_escalated_faces_per_iteration_and_per_face():
  rng = np.random.default_rng(0)
  f = 5

  def outputs(seed_shift):
    return {"estimated_error": rng.uniform(0, 0.1, (3, f)) + seed_shift,
            "nme_interocular_per_iteration": rng.uniform(0, 0.1, (3, f)),
            "iterations": np.full(f, 3, np.int32), "valid": rng.uniform(size=f) > 0.5,
            "file_id": np.array([b"a", b"b", b"c", b"d", b"e"])}
  cheap, own = outputs(0.0), outputs(1.0)
  t = float(np.median(cheap["estimated_error"][-1]))
  merged, up = eval_lib.escalate(cheap, own, t)
  np.testing.assert_array_equal(up, cheap["estimated_error"][-1] >= t)
  for k in ("estimated_error", "nme_interocular_per_iteration"):
    np.testing.assert_array_equal(merged[k][:, up], own[k][:, up])
    np.testing.assert_array_equal(merged[k][:, ~up], cheap[k][:, ~up])
  np.testing.assert_array_equal(merged["valid"], np.where(up, own["valid"], cheap["valid"]))
  np.testing.assert_array_equal(merged["iterations"], np.where(up, 6, 3))
  own["file_id"] = own["file_id"][::-1]
  with pytest.raises(RuntimeError, match="different faces"):
    eval_lib.escalate(cheap, own, t)


def test_robust_val_counts_each_faces_multiply_adds_with_escalation():
  from types import SimpleNamespace  # noqa: PLC0415

  from experiments import robust_val_lib  # noqa: PLC0415
  full = config_lib.for_scheme(68, 34, recurrent_rank=128)
  cheap = dataclasses.replace(full, stage_patches=(9, 17, 34))
  per = np.asarray(cost.iteration_macs(cheap)) / 1e6
  own = SimpleNamespace(model_config=full)
  sub = SimpleNamespace(model_config=cheap)
  own.for_budget_mmacs = lambda b: (sub, None, 0.05)
  got = robust_val_lib._mmacs_per_face(own, 27.7, np.array([1, 3, 6]))  # noqa: SLF001
  np.testing.assert_allclose(got, [per[0], per.sum(), per.sum() + cost.cascade_macs(full) / 1e6])
