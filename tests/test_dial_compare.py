"""experiments.dial_compare: dials of several models from dial_benchmark JSONs."""
import json

import pytest

from experiments import common
from experiments import dial_compare


def _dial(path, nmes, split="val", per_iteration=10.0):
  """A dial_benchmark-shaped JSON: budgets 1.5, 2, 3 at 10 MMACs per iteration."""
  rows = [{"working_point": f"budget {b:g}", "budget": b,
           "batch64": {"mean_iterations": b, "mmacs_per_face": per_iteration * b,
                       "nme": {"interpupil": n, "interocular": n / 2}}}
          for b, n in zip((1.5, 2.0, 3.0), nmes)]
  rows.append({"working_point": "Ts 0.01", "ts": 0.01, "batch64": {}})
  path.write_text(json.dumps({"split": split, "faces": 10, "batch_size": 64,
                              "full_cascade": {"nme": {"interpupil": nmes[-1],
                                                       "interocular": nmes[-1] / 2},
                                               "mmacs_per_face": 3 * per_iteration},
                              "working_points": rows}))
  return str(path)


def test_the_dial_mean_is_the_area_under_the_curve_over_the_range(tmp_path):
  a = _dial(tmp_path / "a.json", (6.0, 5.0, 4.0))
  b = _dial(tmp_path / "b.json", (5.0, 5.0, 5.0))
  table = dial_compare.compare([("a", a), ("b", b)], low=1.5, high=3.0)
  # a: trapezoids (6+5)/2*5 + (5+4)/2*10 = 27.5 + 45 = 72.5 over 15 MMACs.
  assert table["a"]["dial_mean"]["interpupil"] == pytest.approx(72.5 / 15)
  assert table["a"]["dial_mean"]["interocular"] == pytest.approx(72.5 / 30)
  assert table["b"]["dial_mean"]["interpupil"] == pytest.approx(5.0)
  assert table["a"]["full"]["interpupil"] == 4.0
  assert [p["budget"] for p in table["a"]["points"]] == [1.5, 2.0, 3.0]   # Ts rows left out
  # A narrower range uses only its points.
  assert dial_compare.compare([("a", a)], low=2.0, high=3.0)["a"]["dial_mean"][
      "interpupil"] == pytest.approx(4.5)
  text = dial_compare.markdown(table, 1.5, 3.0)
  assert "| a | 4.000 / 2.000 |" in text and "**4.833**" in text


def test_different_splits_and_bad_files_are_refused(tmp_path):
  a = _dial(tmp_path / "a.json", (6.0, 5.0, 4.0))
  c = _dial(tmp_path / "c.json", (6.0, 5.0, 4.0), split="common")
  with pytest.raises(common.UserError, match="different splits"):
    dial_compare.compare([("a", a), ("c", c)])
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(common.UserError, match="bad.json: not a dial_benchmark JSON"):
    dial_compare.compare([("x", str(tmp_path / "bad.json"))])


def test_pareto_marks_the_budgets_where_a_cheaper_static_model_is_better(tmp_path):
  dial = _dial(tmp_path / "dial.json", (6.0, 5.0, 4.0))              # 15, 20, 30 MMACs
  small = _dial(tmp_path / "small.json", (7.0, 6.0, 5.5), per_iteration=6.0)   # 18 MMACs
  tiny = _dial(tmp_path / "tiny.json", (9.0, 8.0, 7.0), per_iteration=4.0)     # 12 MMACs
  table = dial_compare.compare([("dial", dial), ("small", small), ("tiny", tiny)])
  checks = dial_compare.pareto(table, ["small", "tiny"])
  assert set(checks) == {"dial"}
  rows = {r["budget"]: r for r in checks["dial"]}
  # 15 MMACs: only tiny (12) is that cheap, and the dial's 6.0 beats its 7.0.
  assert rows[1.5]["best_static"] == "tiny" and rows[1.5]["dominates"]
  # 20 MMACs: small (18 MMACs, 5.5) beats the dial's 5.0? no: 5.0 <= 5.5.
  assert rows[2.0]["best_static"] == "small" and rows[2.0]["dominates"]
  worse = dial_compare.compare([("dial", _dial(tmp_path / "d2.json", (6.0, 5.8, 4.0))),
                                ("small", small)])
  bad = dial_compare.pareto(worse, ["small"])["dial"]
  assert [r["dominates"] for r in bad] == [True, False, True]
  text = dial_compare.pareto_markdown({"dial": bad})
  assert "above them at budget 2 (20.0 MMACs: 5.800 vs small 5.500)" in text
