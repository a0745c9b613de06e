"""experiments.export_model --format=onnx / --format=tflite (experiments/onnx_export.py):
the shipped model in onnxruntime against the project's own cascade on real 300W crops,
batch 1 and batch > 1 through one file, NaN crops, the one-line errors; the phone model's
layout through TFLite at batch 1."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from musica_jax import model_io
from musica_jax import predictor as predictor_lib

pytest.importorskip("tf2onnx")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

REPO = pathlib.Path(__file__).resolve().parents[1]
ATOL_PX = 0.01          # landmarks (crop pixels)
ATOL_ERROR = 1e-4       # estimated error (inter-ocular NME, ~0.02-0.1)


@pytest.fixture(scope="module")
def default_export(tmp_path_factory):
  """The shipped model exported with --format=onnx once: (Predictor, DIR, session)."""
  if not model_io.is_model_dir(model_io.DEFAULT_MODEL_DIR):
    pytest.skip("no default model ships with this checkout")
  from experiments import onnx_export
  out = tmp_path_factory.mktemp("onnx")
  pred = predictor_lib.Predictor.default()
  onnx_export.export_onnx(str(out), pred)
  session = ort.InferenceSession(str(out / onnx_export.ONNX_FILE),
                                 providers=["CPUExecutionProvider"])
  return pred, out, session


def _run(session, crops):
  names = [o.name for o in session.get_outputs()]
  return dict(zip(names, session.run(None, {"crops": np.asarray(crops, np.float32)})))


def _real_crops(pred, data_dir, n=6):
  """Standardised crops of the first n lfpw test faces (the predictor's crop of the
  landmark box: THE crop of deployment and evaluation)."""
  from data_pipelines import sources
  from musica_jax import images
  scan = sources.scan_ibug300w(str(data_dir / "300w"),
                               parts=sources.ibug300w_parts("lfpw_testset"))
  items = sorted((it for v in scan.splits.values() for it in v), key=lambda it: it.file_id)[:n]
  return np.concatenate([np.asarray(pred.crops(images.read_image(it.image_path,
                                                                 exif_transpose=False),
                                               it.box)[0]) for it in items])


def _check_parity(session, pred, crops):
  """Batch len(crops) and each face at batch 1, against Predictor.run_fast (the full
  cascade with no quitting). Returns the largest landmark difference (px)."""
  ref = pred.run_fast(crops)
  out = _run(session, crops)
  assert out["landmarks"].shape == ref["landmarks"].shape
  np.testing.assert_allclose(out["landmarks"], ref["landmarks"], atol=ATOL_PX, rtol=0)
  np.testing.assert_allclose(out["estimated_error"], ref["estimated_error"], atol=ATOL_ERROR,
                             rtol=0)
  worst = float(np.abs(out["landmarks"] - ref["landmarks"]).max())
  for i in range(len(crops)):
    one = _run(session, crops[i:i + 1])
    assert one["landmarks"].shape == (1, *ref["landmarks"].shape[1:])
    np.testing.assert_allclose(one["landmarks"][0], out["landmarks"][i], atol=1e-4, rtol=0)
    np.testing.assert_allclose(one["estimated_error"][0], out["estimated_error"][i],
                               atol=1e-6, rtol=0)
  return worst


def test_onnx_default_model_matches_the_cascade_on_real_faces(default_export, shared_data):
  """Six real lfpw test faces: onnxruntime's landmarks within 0.01 px of the project's
  cascade, at batch 6 and batch 1 through the same file."""
  pred, _, session = default_export
  crops = _real_crops(pred, shared_data)
  worst = _check_parity(session, pred, crops)
  print(f"onnx vs run_fast on 6 real faces: max |landmark diff| {worst:.2e} px")


def test_onnx_default_model_file_side_car_batch_and_nan(default_export):
  """The file: a valid ONNX model with a symbolic batch B, the side-car JSON of the
  StableHLO export (inputs, outputs, crop rule, mean shape); random crops at batch 3
  and 1 match the cascade; a crop with a NaN gets NaN, its neighbours do not."""
  from experiments import onnx_export
  pred, out, session = default_export
  model = onnx.load(str(out / onnx_export.ONNX_FILE))
  onnx.checker.check_model(model)
  dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
  assert [(v.name, dims(v)) for v in model.graph.input] == [("crops", ["B", 228, 228, 3])]
  assert [(v.name, dims(v)) for v in model.graph.output] == [
      ("landmarks", ["B", 68, 2]), ("estimated_error", ["B"])]
  side = json.loads((out / (onnx_export.ONNX_FILE + ".json")).read_text())
  assert side["format"] == "musica-jax-onnx" and side["input"]["shape"][0] == "B"
  assert [o["name"] for o in side["outputs"]] == ["landmarks", "estimated_error"]
  assert "rule" in side["crop"] and len(side["mean_shape"]) == 68
  crops = np.random.default_rng(3).normal(size=(3, 228, 228, 3)).astype(np.float32)
  _check_parity(session, pred, crops)
  crops[1, 5, 7, 0] = np.nan
  got = _run(session, crops)
  assert np.isnan(got["landmarks"][1]).all() and np.isnan(got["estimated_error"][1])
  assert np.isfinite(got["landmarks"][[0, 2]]).all()


def _random_predictor(num_patches, **overrides):
  """A 68-point model with random weights whose heads move the landmarks (by pixels to
  tens of pixels) and whose recurrent layer matters; the shipped mean shape."""
  from musica_jax import config as config_lib
  from musica_jax import schemes
  from musica_jax import stage_net
  cfg = config_lib.for_scheme(schemes.get_scheme(68), num_patches, **overrides)
  params = stage_net.init_stacked(jax.random.key(0), cfg)
  head = params["head"]
  head["bias"] = head["bias"].at[:, :-1].set(
      3.0 * jax.random.normal(jax.random.key(1), head["bias"][:, :-1].shape))
  head["kernel"] = head["kernel"] * 50
  params["recurrent"] = {k: v * 4 for k, v in params["recurrent"].items()}
  params = jax.tree.map(np.asarray, params)
  return predictor_lib.Predictor(params, cfg, model_io.load("default").mean_shape)


def _phone_predictor():
  """The phone model's layout (experiments/configs/300w_mobile.flags: 23 patches, levels
  1 then 0, no local attention), random weights (no trained phone model ships)."""
  return _random_predictor(23, levels=(1, 0), use_attention=False)


@pytest.mark.slow      # one conversion each (~5 s)
@pytest.mark.parametrize("overrides", [
    {"extractor": "inverted_bottleneck"}, {"global_attention": "fc"},
    {"global_attention": "gcn"}, {"compute_dtype": "bfloat16"}, {"recurrent_rank": 16}],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_onnx_ablation_variants_match_the_cascade(overrides):
  """The Table 4 variants, bf16 compute and the factored recurrent layer convert too."""
  from experiments import onnx_export
  pred = _random_predictor(19, hidden_size=32, **overrides)
  session = ort.InferenceSession(onnx_export.convert_onnx(pred).SerializeToString(),
                                 providers=["CPUExecutionProvider"])
  crops = np.random.default_rng(0).normal(size=(2, 228, 228, 3)).astype(np.float32)
  assert np.abs(pred.run_fast(crops)["landmarks"] - pred.mean_shape).max() > 1
  _check_parity(session, pred, crops)


@pytest.mark.slow      # ~15-25 s on 2 loaded cores (one more conversion)
@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_tflite_phone_model_matches_the_cascade(tmp_path):
  """--format=tflite on the phone model's layout: the interpreter's landmarks at batch 1
  within 0.01 px of the cascade's."""
  tf = pytest.importorskip("tensorflow")
  from experiments import onnx_export
  pred = _phone_predictor()
  onnx_export.export_tflite(str(tmp_path), pred)
  interp = tf.lite.Interpreter(model_path=str(tmp_path / onnx_export.TFLITE_FILE))
  runner = interp.get_signature_runner()
  crops = np.random.default_rng(5).normal(size=(2, 228, 228, 3)).astype(np.float32)
  ref = pred.run_fast(crops)
  assert np.abs(ref["landmarks"] - pred.mean_shape).max() > 1   # the weights move them
  for i in range(2):
    got = runner(crops=crops[i:i + 1])
    np.testing.assert_allclose(got["landmarks"][0], ref["landmarks"][i], atol=ATOL_PX, rtol=0)
    np.testing.assert_allclose(got["estimated_error"][0], ref["estimated_error"][i],
                               atol=ATOL_ERROR, rtol=0)


def test_missing_converter_and_bad_output_are_one_line(tmp_path, monkeypatch):
  """Without tf2onnx: one line with the install hint, exit 1, no traceback (a fresh
  process); --output onto a file, or onto a DIR whose model.onnx is a directory: one line
  naming it, before any work."""
  from experiments import common
  from experiments import onnx_export
  (tmp_path / "a_file").write_text("mine")
  (tmp_path / "out" / "model.onnx").mkdir(parents=True)
  blocker = tmp_path / "blocker"
  blocker.mkdir()
  (blocker / "tf2onnx.py").write_text("raise ImportError('No module named tf2onnx')\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(REPO)]))
  cmd = [sys.executable, "-m", "experiments.export_model", "--format=onnx", "--model=default"]
  procs = {
      "no_converter": subprocess.Popen([*cmd, f"--output={tmp_path / 'x'}"], env=env,
                                       cwd=REPO, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True),
      "onto_a_file": subprocess.Popen([*cmd, f"--output={tmp_path / 'a_file'}"], cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)}
  with pytest.raises(common.UserError, match="model.onnx exists and is a directory"):
    onnx_export.check_output(str(tmp_path / "out"), "onnx")
  monkeypatch.setitem(sys.modules, "tf2onnx", None)
  with pytest.raises(common.UserError, match=r"pip install 'musica-jax\[onnx\]'"):
    onnx_export.require("tf2onnx")
  want = {"no_converter": "pip install 'musica-jax[onnx]'",
          "onto_a_file": f"--output={tmp_path / 'a_file'}: exists and is not a directory"}
  for name, proc in procs.items():
    so, se = proc.communicate(timeout=300)
    assert proc.returncode == 1, (name, so[-2000:], se[-2000:])
    assert "Traceback" not in se, se[-3000:]
    lines = [l for l in se.splitlines() if l.startswith("export_model: error:")]
    assert len(lines) == 1 and want[name] in lines[0], (name, se[-3000:])
  assert not (tmp_path / "x").exists()
