"""experiments.evaluate on exported models: the shipped default model reproduces its own
evaluation JSON on the real 300W common set, and the side by side with dlib comes from the
same run."""
import importlib.util
import json
import pathlib

from absl import app
import pytest

from data_pipelines import config as config_lib
from experiments import evaluate
from musica_jax import model_io
from musica_jax import predictor

REPO = pathlib.Path(__file__).resolve().parents[1]
DLIB_JSON = REPO / "results" / "dlib_300w_common.json"
HAVE_DLIB = (importlib.util.find_spec("dlib") is not None
             and importlib.util.find_spec("face_recognition_models") is not None)


def _cfg(data_dir, tfds_dir):
  return config_lib.DataConfig(dataset="ibug300w", data_dir=str(data_dir), tfds_dir=tfds_dir,
                               num_points=68, eval_split="common", eval_batch_size=64)


@pytest.fixture(scope="module")
def default_model_run(shared_data, tfds_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("eval") / "default.json"
  result = evaluate.evaluate(None, str(out), ["common"], _cfg(shared_data / "300w", tfds_dir),
                             model="default", with_dlib=HAVE_DLIB,
                             dlib_box_fit_json=str(DLIB_JSON))
  return result, out


def test_shipped_model_reproduces_its_evaluation(default_model_run):
  result, out = default_model_run
  got = result["splits"]["common"]
  meta = model_io.load_model(predictor.default_model_path()).metadata
  want = meta["evaluation"]["splits"]["common"]
  assert got["faces"] == want["faces"] == 554
  for key in ("nme_interpupil", "nme_interocular", "fr_008", "auc_008"):
    assert got[key] == pytest.approx(want[key], abs=1e-3), key
  assert result["model_name"] == meta["name"]
  assert json.loads(out.read_text())["splits"]["common"]["faces"] == 554
  assert out.with_suffix(".ced.png").stat().st_size > 0


@pytest.mark.skipif(not HAVE_DLIB, reason="dlib / face-recognition-models not installed "
                    "(optional: pip install 'musica-jax[peers]')")
def test_side_by_side_with_dlib_from_the_same_run(default_model_run):
  result, _ = default_model_run
  rows = result["side_by_side"]["common"]["rows"]
  assert [r["method"].split()[0] for r in rows] == ["MuSiCa", "dlib"]
  assert rows[0]["nme_interpupil"] == result["splits"]["common"]["nme_interpupil"]
  assert rows[0]["faces"] == rows[1]["faces"] == 554
  earlier = json.loads(DLIB_JSON.read_text())["rows"][0]   # same box fit -> same dlib numbers
  for key in ("nme_interpupil", "nme_interocular", "fr_008"):
    assert rows[1][key] == pytest.approx(earlier[key], abs=1e-4), key


def test_exactly_one_model_source(tmp_path):
  cfg = config_lib.DataConfig(dataset="ibug300w", data_dir=str(tmp_path))
  with pytest.raises(app.UsageError, match="exactly one"):
    evaluate.evaluate(None, str(tmp_path / "o.json"), ["common"], cfg)
  with pytest.raises(app.UsageError, match="exactly one"):
    evaluate.evaluate("wd", str(tmp_path / "o.json"), ["common"], cfg, model="default")
  with pytest.raises(app.UsageError, match="nowhere"):
    evaluate.evaluate(None, str(tmp_path / "o.json"), ["common"], cfg,
                      model=str(tmp_path / "nowhere"))
