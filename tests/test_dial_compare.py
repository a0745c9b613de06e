"""experiments.dial_compare: dials of several models from dial_benchmark JSONs."""
import json
import types

import numpy as np
import pytest

from experiments import common
from experiments import dial_compare


def _dial(path, nmes, split="val", per_iteration=10.0, model_path=None):
  """A dial_benchmark-shaped JSON: budgets 1.5, 2, 3 at 10 MMACs per iteration."""
  rows = [{"working_point": f"budget {b:g}", "budget": b,
           "batch64": {"mean_iterations": b, "mmacs_per_face": per_iteration * b,
                       "nme": {"interpupil": n, "interocular": n / 2}}}
          for b, n in zip((1.5, 2.0, 3.0), nmes)]
  rows.append({"working_point": "Ts 0.01", "ts": 0.01, "batch64": {}})
  path.write_text(json.dumps({"split": split, "faces": 10, "batch_size": 64,
                              **({"model_path": model_path} if model_path else {}),
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
  # The NME table gives a static model its full cascade only.
  row = next(x for x in dial_compare.markdown(table, 1.5, 3.0, ("small", "tiny")).splitlines()
             if x.startswith("| small |"))
  assert row.startswith("| small | 5.500 / ") and row.endswith("| static |") and "6.000" not in row


def test_pareto_by_ms_marks_the_budgets_where_a_faster_static_model_is_better():
  """The same check on ms per face (after --time): a static model counts against a dial
  point when it is no slower, whatever its MMACs."""
  point = lambda b, nme, ms: {"budget": b, "interpupil": nme, "ms": ms}  # noqa: E731
  table = {"dial": {"points": [point(1.5, 6.0, 1.0), point(2.0, 5.0, 1.4), point(3.0, 4.0, 2.0)]},
           "fast": {"full": {"interpupil": 5.5}, "full_ms": 1.2, "full_mmacs": 99.0},
           "slow": {"full": {"interpupil": 3.0}, "full_ms": 2.5}}
  rows = {r["budget"]: r for r in dial_compare.pareto(table, ["fast", "slow"], "ms")["dial"]}
  assert rows[1.5]["best_static"] is None and rows[1.5]["dominates"]    # nothing that fast
  assert rows[2.0]["best_static"] == "fast" and rows[2.0]["dominates"]  # 5.0 <= 5.5
  worse = {**table, "fast": {**table["fast"], "full": {"interpupil": 3.9}}}
  checks = dial_compare.pareto(worse, ["fast", "slow"], "ms")
  assert [r["dominates"] for r in checks["dial"]] == [True, False, False]
  assert all("ms" in r and "mmacs" not in r for r in checks["dial"])
  text = dial_compare.pareto_markdown(checks, "ms")
  assert "by ms per face" in text
  assert "budget 2 (1.40 ms: 5.000 vs fast 3.900), budget 3 (2.00 ms: 4.000 vs fast 3.900)" in text


def _tiny_model(path):
  """An exported 68-point model (all weights zero: it returns the mean shape) with a
  quitting profile, so that it takes a budget."""
  from musica_jax import config, model_io, quit_head  # noqa: PLC0415
  cfg = config.ModelConfig(num_landmarks=68, patch_indices=tuple(range(0, 68, 4)),
                           hidden_size=16)
  import jax  # noqa: PLC0415
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), model_io.param_template(cfg))
  model_io.save_model(path, params, cfg, np.random.default_rng(2).uniform(60, 170, (68, 2)))
  quit_head.save(path, None, {"kind": "estimated_error",
                              "profile": [[1.0, 0.0, 0.0], [2.0, 0.75, 0.25], [3.0, 1.0, 1.0]],
                              "thresholds": [[1.0, 1.0], [-1.0, 3.0]]})
  return str(path)


def _faces_split(n=4):
  """The faces of a split as datasets.load_split gives them: encoded photos, boxes,
  landmarks in the photos."""
  from PIL import Image  # noqa: PLC0415
  import io  # noqa: PLC0415
  rng = np.random.default_rng(0)
  images = []
  for _ in range(n):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (160, 150, 3), dtype=np.uint8)).save(buf, "PNG")
    images.append(buf.getvalue())
  return types.SimpleNamespace(images=images, boxes=np.tile([20.0, 20.0, 130.0, 140.0], (n, 1)),
                               landmarks=rng.uniform(30, 120, (n, 68, 2)).astype(np.float32))


def test_time_table_times_every_point_in_one_run_and_writes_the_ms_columns(tmp_path,
                                                                           monkeypatch):
  """--time end to end on a tiny model: each dial at its full cascade and every budget,
  the static model at its full cascade only, through Predictor.predict; the ms table, the
  ms Pareto check and the NME-vs-ms plot (structure and positivity only: no timings)."""
  from data_pipelines import datasets  # noqa: PLC0415
  model = _tiny_model(tmp_path / "model")
  monkeypatch.setattr(datasets, "load_split", lambda cfg, split: _faces_split())
  table = dial_compare.compare([
      ("dial", _dial(tmp_path / "d.json", (6.0, 5.0, 4.0), model_path=model)),
      ("static", _dial(tmp_path / "s.json", (7.0, 6.0, 5.5), per_iteration=6.0))])
  with pytest.raises(common.UserError, match="static does not name its model.*"
                     "--models=static:DIR"):
    dial_compare.time_table(table, ["static"], {}, None, 4, 1)
  timing = dial_compare.time_table(table, ["static"], {"static": model}, None, batch=4,
                                   rounds=2)
  assert timing["batch"] == 4 and timing["faces"] == 4 and timing["cpu_count"] >= 1
  assert [r["budget"] for r in timing["models"]["dial"]] == [None, 1.5, 2.0, 3.0]
  assert [r["budget"] for r in timing["models"]["static"]] == [None]
  assert [r["mean_iterations"] for r in timing["models"]["dial"]] == [3.0, 1.5, 2.0, 3.0]
  assert table["dial"]["full_ms"] > 0 and table["static"]["full_ms"] > 0
  assert all(p["ms"] > 0 and p["timed_nme"] > 0 for p in table["dial"]["points"])
  assert not any("ms" in p for p in table["static"]["points"])
  text = dial_compare.markdown_ms(table, timing, ["static"])
  assert "ONE run" in text and "Training must be paused" in text and "CPU cores" in text
  rows = [line for line in text.splitlines() if line.startswith("| ")]
  assert rows[0] == "| model (ms/face) | full cascade | budget 1.5 | budget 2 | budget 3 |"
  assert rows[1].startswith("| dial | ") and rows[1].count("|") == 6
  assert rows[2].startswith("| static | ") and rows[2].endswith("|  |  |  |")
  assert "differs from the dial JSONs'" in text     # a zero model is not what they measured
  checks = dial_compare.pareto(table, ["static"], "ms")
  assert [r["budget"] for r in checks["dial"]] == [1.5, 2.0, 3.0]
  dial_compare.plot(table, ["static"], str(tmp_path / "p_ms.png"), "ms")
  assert (tmp_path / "p_ms.png").stat().st_size > 0
