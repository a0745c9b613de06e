"""Early-exit policies on constructed per-iteration errors (answers computed by hand)."""
import itertools
import json
import warnings

import numpy as np
import pytest

from experiments import early_exit_assignment as assignment
from experiments import early_exit_oracle as oracle
from experiments import early_exit_policies as eep
from experiments import estimate_calibration

# 3 iterations (rows) x 4 faces (columns).
NME = np.array([[4.0, 2.0, 6.0, 8.0],
                [3.0, 1.0, 3.0, 7.0],
                [2.0, 1.0, 1.0, 7.0]])
EST = np.array([[0.50, 0.10, 0.60, 0.90],
                [0.40, 0.05, 0.20, 0.80],
                [0.30, 0.01, 0.10, 0.70]])


def test_policy_exit_iterations_and_nme():
  # Ts = 0.25: face 0 never below -> last; face 1 quits at 1; face 2 at 2; face 3 last.
  p = eep.policy(NME, EST, 0.25)
  np.testing.assert_array_equal(p["exit_idx"], [2, 0, 1, 2])
  np.testing.assert_array_equal(p["counts"], [1, 1, 2])
  assert p["mean_iterations"] == pytest.approx(9 / 4)
  assert p["nme"] == pytest.approx((2 + 2 + 3 + 7) / 4)
  # Ts = 0.15: only face 1 quits early; face 2's 0.20 is not below.
  p = eep.policy(NME, EST, 0.15)
  np.testing.assert_array_equal(p["exit_idx"], [2, 0, 2, 2])
  assert p["mean_iterations"] == pytest.approx(2.5)
  assert p["nme"] == pytest.approx(3.0)
  # Strict comparison: face 1's E == Ts = 0.10 does not quit at 1 (it does at 2, 0.05).
  np.testing.assert_array_equal(eep.exit_iterations(EST, 0.10), [2, 1, 2, 2])
  # Extremes: everyone runs everything / everyone quits after the first iteration.
  assert eep.policy(NME, EST, -np.inf)["nme"] == pytest.approx(11 / 4)
  assert eep.policy(NME, EST, np.inf)["nme"] == pytest.approx(5.0)
  assert eep.policy(NME, EST, np.inf)["mean_iterations"] == 1.0


def test_random_baseline():
  # counts [1, 0, 3]: expectation (1 * mean(row 0) + 3 * mean(row 2)) / 4 = 3.3125.
  r = eep.random_baseline(NME, [1, 0, 3], draws=50, seed=0)
  assert r["expected"] == pytest.approx((5 + 3 * 2.75) / 4)
  assert r == eep.random_baseline(NME, [1, 0, 3], draws=50, seed=0)   # seeded
  # Each draw is one of the 4 choices of the face at iteration 1: means 13, 12, 16, 12 / 4.
  assert 3.0 <= r["nme"] <= 4.0 and abs(r["nme"] - 3.3125) < 0.25
  many = eep.random_baseline(NME, [1, 0, 3], draws=4000, seed=1)
  assert many["nme"] == pytest.approx(3.3125, abs=0.03)
  # Every face alike: every assignment with these counts has the same NME.
  same = np.array([[5.0] * 6, [3.0] * 6, [2.0] * 6])
  r = eep.random_baseline(same, [2, 1, 3], draws=50, seed=3)
  assert r["nme"] == pytest.approx((2 * 5 + 3 + 3 * 2) / 6)
  assert r["std"] == pytest.approx(0.0, abs=1e-12)
  with pytest.raises(ValueError):
    eep.random_baseline(NME, [1, 1, 1])    # counts must sum to F


def test_oracle_hand_example():
  # counts [1, 1, 2]. Relative to everyone at iteration 3 (total 11), moving a face to
  # iteration 1 costs (+2, +1, +5, +1), to iteration 2 (+1, 0, +2, 0): the best is +1
  # (face 1 to it. 1 and face 3 to it. 2, or the reverse): 12 / 4 = 3.0.
  opt = oracle.oracle_assignment(NME, [1, 1, 2])
  np.testing.assert_array_equal(assignment.counts_of(opt, 3), [1, 1, 2])
  assert assignment.assignment_nme(NME, opt).mean() == pytest.approx(3.0)
  # The sequential reading: it. 1 <- lowest row-0 error (face 1); it. 2 <- lowest row-1
  # error of the rest (faces 0 and 2 tie at 3: face 0); the rest last: (2+3+1+7)/4.
  seq = oracle.oracle_sequential_assignment(NME, [1, 1, 2])
  np.testing.assert_array_equal(seq, [1, 0, 2, 2])
  assert assignment.assignment_nme(NME, seq).mean() == pytest.approx(3.25)
  # Ours at Ts = 0.25 has the same counts and NME 3.5: oracle <= sequential <= ours.


def test_oracle_is_the_brute_force_optimum():
  rng = np.random.default_rng(0)
  for trial in range(150):
    s, f = int(rng.integers(2, 5)), int(rng.integers(1, 7))
    nme = rng.random((s, f))
    if trial % 3 == 0:
      nme = np.round(nme, 1)    # ties
    counts = np.bincount(rng.integers(0, s, f), minlength=s)
    labels = np.repeat(np.arange(s), counts)
    best = min(nme[list(p), np.arange(f)].sum() for p in set(itertools.permutations(labels)))
    got = oracle.oracle_assignment(nme, counts)
    np.testing.assert_array_equal(assignment.counts_of(got, s), counts)
    assert assignment.assignment_nme(nme, got).sum() == pytest.approx(best, abs=1e-9)


def test_sweep_orders_the_three_policies():
  sw = eep.sweep(NME, EST, ts_values=[-np.inf, 0.15, 0.25, np.inf], draws=50, seed=0)
  assert sw["mean_iterations"] == pytest.approx([3.0, 2.5, 2.25, 1.0])
  assert sw["nme_policy"] == pytest.approx([2.75, 3.0, 3.5, 5.0])
  assert sw["nme_oracle"] == pytest.approx([2.75, 3.0, 3.0, 5.0])
  assert sw["nme_random_expected"] == pytest.approx([2.75, 3.3125, 3.5, 5.0])
  assert sw["counts"][2] == [1, 1, 2]
  # Default grid: -inf, then just above every distinct estimate of iterations 1..S-1.
  grid = eep.ts_grid(EST)
  assert grid[0] == -np.inf and len(grid) == 1 + 8
  sw = eep.sweep(NME, EST)
  assert sw["mean_iterations"][0] == 3.0 and sw["mean_iterations"][-1] == 1.0
  assert np.all(np.diff(sw["mean_iterations"]) <= 0)
  for o, p, q in zip(sw["nme_oracle"], sw["nme_policy"], sw["nme_random_expected"]):
    assert o <= p + 1e-12 and o <= q + 1e-12


def test_perfect_estimator_beats_random_on_a_larger_set():
  rng = np.random.default_rng(1)
  nme = np.sort(rng.gamma(2.0, 2.0, (3, 300)), axis=0)[::-1]     # errors fall per iteration
  sw = eep.sweep(nme, nme, max_points=60, draws=20)
  c = eep.compare_at(sw, 2.0)
  assert c["policy_nme"] < c["random_nme"] and c["oracle_nme"] <= c["policy_nme"] + 1e-9
  assert c["relative_gain"] > 0 and c["policy_iterations_to_match"] < 2.0


def test_t_fail_curve():
  t_fail = eep.t_fail_curve([1.0, 2.0, 3.0, 4.0], [0.1, 0.4, 0.2, 0.3], failure_threshold=2.5)
  assert t_fail["t_fail"] == [np.inf, 0.4, 0.3, 0.2]
  assert t_fail["invalid_fraction"] == pytest.approx([0.0, 0.25, 0.5, 0.75])
  assert t_fail["nme_remaining"] == pytest.approx([2.5, 8 / 3, 2.0, 1.0])
  assert t_fail["nme_remaining_oracle"] == pytest.approx([2.5, 2.0, 1.5, 1.0])
  assert t_fail["fr_remaining"] == pytest.approx([0.5, 2 / 3, 0.5, 0.0])
  assert t_fail["nme_all"] == pytest.approx(2.5)


def test_working_points():
  sw = eep.sweep(NME, EST, ts_values=[-np.inf, 0.15, 0.25, np.inf])
  # mean iterations [3, 2.5, 2.25, 1], NME [2.75, 3.0, 3.5, 5.0].
  assert eep.ts_for_target_nme(sw, 3.0)["ts"] == 0.15
  assert eep.ts_for_target_nme(sw, 2.8)["ts"] == -np.inf
  assert eep.ts_for_target_nme(sw, 2.0) is None
  assert eep.ts_for_budget(sw, max_mean_iterations=2.3)["ts"] == 0.25
  assert eep.ts_for_budget(sw, max_mean_iterations=0.5) is None
  p = eep.ts_for_budget(sw, max_macs=25.0, macs_per_iteration=10.0)
  assert p["ts"] == 0.15 and p["macs"] == pytest.approx(25.0)
  # Per-iteration MACs: [10, 20, 30] -> cumulative 10, 30, 60 per exit iteration.
  assert eep.expected_macs([1, 1, 2], [10, 20, 30]) == pytest.approx((10 + 30 + 120) / 4)
  with pytest.raises(ValueError):
    eep.ts_for_budget(sw)


def test_threshold_analysis_working_points_t_fail_and_figure1_faces():
  from experiments import threshold_analysis as ta  # noqa: PLC0415
  sw = eep.sweep(NME, EST, ts_values=[-np.inf, 0.15, 0.25, np.inf])
  # Default targets: the full cascade's NME (2.75) + 1%, 5%, 10%; default budgets.
  wp = ta.working_points(sw, 2.75, 10.0)
  assert [t["target"] for t in wp["target_nme"]] == pytest.approx([2.7775, 2.8875, 3.025])
  assert [t["point"]["ts"] for t in wp["target_nme"]] == [-np.inf, -np.inf, 0.15]
  assert [b["budget"] for b in wp["budget_iterations"]] == [1.25, 1.5, 2.0, 2.5]
  assert wp["budget_iterations"][-1]["point"]["ts"] == 0.15 and wp["budget_mmacs"] == []
  given = ta.working_points(sw, 2.75, 10.0, target_nme=(3.5,), budget_mmacs=(25.0,))
  assert given["target_nme"][0]["point"]["ts"] == 0.25
  assert given["budget_mmacs"][0]["point"]["ts"] == 0.15
  # Tf under Ts=0.25: exits [2, 0, 1, 2] -> final NME [2, 2, 3, 7], estimates [.3, .1, .2, .7].
  t_fail = ta.t_fail_analysis(NME, EST, 0.25)
  assert t_fail["mean_iterations"] == pytest.approx(2.25)
  assert t_fail["failure_threshold_nme"] == 8.0 and t_fail["ts"] == 0.25
  assert ta.t_fail_analysis(NME, EST, None)["mean_iterations"] == 3.0
  # Figure 1: faces spread over the exit iterations, ordered by exit iteration.
  exit_idx = np.array([0, 0, 0, 1, 2, 2, 0, 1])
  picked = ta.pick_figure1_faces(exit_idx, 4)
  assert len(set(picked.tolist())) == 4 and set(exit_idx[picked]) == {0, 1, 2}
  assert list(exit_idx[picked]) == sorted(exit_idx[picked])
  assert len(ta.pick_figure1_faces(exit_idx, 20)) == 8


def test_compare_at():
  sw = {"ts": [np.inf, 0.1, -np.inf], "mean_iterations": [1.0, 2.0, 3.0],
        "nme_policy": [5.0, 3.0, 2.0], "nme_random": [5.0, 4.0, 2.0],
        "nme_oracle": [5.0, 2.5, 2.0]}
  c = eep.compare_at(sw, 2.0)
  assert c["random_nme"] == 4.0 and c["policy_nme"] == 3.0 and c["oracle_nme"] == 2.5
  assert c["relative_gain"] == pytest.approx(0.25)
  assert c["policy_iterations_to_match"] == pytest.approx(1.5)   # 5 -> 3 crosses 4 at 1.5
  assert c["iterations_ratio"] == pytest.approx(0.75)
  assert eep.compare_at(sw, 3.5)["relative_gain"] is None


def test_rank_correlations():
  pearson, spearman = estimate_calibration.pearson, estimate_calibration.spearman
  assert pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(3 / np.sqrt(2 * 42 / 9))
  assert spearman([1, 2, 3], [1, 2, 4]) == pytest.approx(1.0)
  assert spearman([1, 2, 3, 4], [9, 7, 3, 1]) == pytest.approx(-1.0)
  # Ties: average ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4].
  r = spearman([1, 2, 2, 3], [1, 2, 3, 4])
  assert r == pytest.approx(pearson([1, 2.5, 2.5, 4], [1, 2, 3, 4]))
  # NaN ranks above every value, the NaNs tied: ranks [1, 3.5, 2, 3.5] (Pearson: NaN).
  assert spearman([1, np.nan, 3, np.nan], [1, 2, 3, 4]) == pytest.approx(
      pearson([1, 3.5, 2, 3.5], [1, 2, 3, 4]))
  assert np.isnan(pearson([1, np.nan, 3], [1, 2, 3]))
  # Degenerate inputs (a constant, fewer than 2 points): NaN, no warning, no error.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for corr in (pearson, spearman):
      for x, y in (([1, 1, 1], [1, 2, 3]), ([2, 2], [3, 3]), ([1.0], [2.0]), ([], [])):
        assert np.isnan(corr(x, y))
  with pytest.raises(ValueError, match="shapes differ"):
    pearson([1, 2, 3], [1, 2])
  cal = estimate_calibration.calibration(EST, NME, NME / 100)
  assert len(cal["per_iteration"]) == 3
  assert cal["per_iteration"][2]["spearman"] == pytest.approx(spearman(EST[2], NME[2]))
  assert cal["pooled"]["mean_abs_diff"] == pytest.approx(np.abs(EST - NME).mean())


@pytest.mark.slow
def test_sweep_thresholds_command(tmp_path, parse_flags):
  """Trains a tiny model for 3 steps on synthetic faces (in this process), then runs the
  command."""
  from experiments import train  # noqa: PLC0415
  from experiments import train_lib  # noqa: PLC0415
  wd, tfds = tmp_path / "wd", tmp_path / "tfds"
  small = ["--flagfile=demo.flags", f"--tfds_dir={tfds}", "--batch_size=8",
           "--eval_batch_size=8", "--synthetic_train_size=16", "--synthetic_test_size=8",
           "--num_patches=19", "--hidden_size=64"]
  parse_flags(*small, f"--workdir={wd}", "--steps=3", "--eval_every=0", "--checkpoint_every=3",
              "--log_every=1")
  train_lib.train_and_evaluate(train.config_from_flags(), str(wd))
  out = tmp_path / "sweep.json"
  from data_pipelines import config as data_config  # noqa: PLC0415
  from experiments import sweep_thresholds_lib  # noqa: PLC0415
  data_cfg = data_config.DataConfig(dataset="synthetic_faces", num_points=68,
                                    eval_split="test", tfds_dir=str(tfds), batch_size=8,
                                    eval_batch_size=8, synthetic_train_size=16,
                                    synthetic_test_size=8)
  sweep_thresholds_lib.run(sweep_thresholds_lib.SweepConfig(
      output_json=str(out), workdir=str(wd), plot=str(tmp_path / "fig2.png"), draws=5,
      figure1=str(tmp_path / "fig1.png"), figure1_faces=3, figure7_workdirs=(str(wd),)),
      data_cfg)
  data = json.loads(out.read_text())
  assert data["faces"] == 8 and data["synthetic_data"]
  sw = data["sweep"]
  assert sw["mean_iterations"][0] == 3.0 and len(sw["nme_oracle"]) == len(sw["ts"])
  for name in ("fig2.png", "fig2.t_fail.png", "fig2.calibration.png", "fig1.png",
               "sweep.figure7.png", "sweep.figure7.json"):
    assert (tmp_path / name).stat().st_size > 0
