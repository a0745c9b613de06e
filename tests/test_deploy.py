"""Deployment: the portable StableHLO artifact, box-free prediction (detector), video
tracking, the crop without per-photo-size compilation."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from musica_jax import model_io
from musica_jax import portable
from musica_jax import predictor as predictor_lib
from musica_jax import stage_net
from musica_jax.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ModelConfig(num_landmarks=10, patch_indices=(0, 2, 4, 6, 8, 9), hidden_size=64,
                    image_size=64, init_std=0.5)


def _small_predictor():
  params = stage_net.init_stacked(jax.random.PRNGKey(0), SMALL)
  mean = np.random.default_rng(1).uniform(16, 48, (10, 2)).astype(np.float32)
  return predictor_lib.Predictor(params, SMALL, mean, max_batch=8)


def test_stablehlo_symbolic_batch_matches_the_predictor():
  """One exported program serves every batch size and gives the predictor's full-cascade
  landmarks and estimated error (float32 weights: not bfloat16-exact)."""
  p = _small_predictor()
  assert portable.weight_dtype(p.params) == "float32"
  exp = jax.export.deserialize(portable.export_stablehlo(p.params, SMALL, p.mean_shape))
  assert str(exp.in_avals[0].shape[0]) == "b"
  rng = np.random.default_rng(2)
  for n in (1, 3):
    crops = rng.normal(size=(n, 64, 64, 3)).astype(np.float32)
    lm, err = exp.call(crops)
    ref = p.run_fast(crops)
    assert lm.shape == (n, 10, 2) and err.shape == (n,)
    np.testing.assert_allclose(np.asarray(lm), ref["landmarks"], atol=1e-4)
    np.testing.assert_allclose(np.asarray(err), ref["estimated_error"], atol=1e-6)
    assert np.abs(np.asarray(lm) - p.mean_shape).max() > 1e-3   # the model moved them


_RUN_WITHOUT_MODEL_CODE = r"""
import sys
sys.modules["musica_jax"] = None          # any import of this package now fails
import jax, numpy as np
d = np.load(sys.argv[2])
exp = jax.export.deserialize(open(sys.argv[1], "rb").read())
lm, err = exp.call(d["crops"])
np.savez(sys.argv[3], landmarks=np.asarray(lm), error=np.asarray(err))
"""


def test_exported_default_model_runs_without_model_code(tmp_path):
  """experiments.export_model --format=stablehlo on the shipped model; a fresh process
  that cannot import musica_jax loads it and reproduces Predictor.predict's landmarks
  (crop frame) and estimated error on a photo."""
  if not model_io.is_model_dir(predictor_lib.DEFAULT_MODEL_DIR):
    pytest.skip("no default model ships with this checkout")
  from experiments import export_model
  info = export_model.export_portable(str(tmp_path / "hlo"), model="default",
                                      platforms=("cpu",))
  assert info["weight_dtype"] == "bfloat16" and info["input"]["shape"][0] == "B"
  side = json.loads((tmp_path / "hlo" / "model.stablehlo.json").read_text())
  assert side["outputs"][0]["name"] == "landmarks"
  p = predictor_lib.Predictor.default()
  rng = np.random.default_rng(0)
  image = (rng.uniform(0, 1, (180, 150, 3)) ** 2 * 255).astype(np.uint8)
  boxes = [(30, 40, 120, 140), (10, 20, 70, 90)]
  pred = p.predict(image, boxes)
  crops = np.asarray(p.crops(image, boxes)[0])
  np.savez(tmp_path / "in.npz", crops=crops)
  env = dict(os.environ, PYTHONPATH="")
  res = subprocess.run([sys.executable, "-c", _RUN_WITHOUT_MODEL_CODE,
                        str(tmp_path / "hlo" / "model.stablehlo"), str(tmp_path / "in.npz"),
                        str(tmp_path / "out.npz")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  out = np.load(tmp_path / "out.npz")
  np.testing.assert_allclose(out["landmarks"], pred.crop_landmarks, atol=1e-4)
  np.testing.assert_allclose(out["error"], pred.estimated_error, atol=1e-6)


def test_photo_sizes_compile_nothing_new():
  """Faces in photos of many sizes run one cascade program per face-batch bucket: the
  crop is on the host (nothing compiled per photo size)."""
  from musica_jax import fast_inference
  p = _small_predictor()
  rng = np.random.default_rng(4)
  p.predict(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8), (5, 5, 40, 45))
  before = fast_inference.run_selective._cache_size()
  for h, w in ((61, 333), (480, 97), (1001, 777), (123, 124)):
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    pred = p.predict(image, (w * 0.2, h * 0.2, w * 0.7, h * 0.8))
    assert len(pred) == 1
  assert fast_inference.run_selective._cache_size() == before
