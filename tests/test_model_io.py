"""The exported model format: round trip in float32 (exact) and bfloat16 (rounded), checks."""
import json

import jax
import ml_dtypes
import numpy as np
import pytest

from musica_jax import model_io
from musica_jax.config import ModelConfig

CFG = ModelConfig(num_landmarks=68, patch_indices=tuple(range(0, 68, 4)), hidden_size=32)


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32),
                      model_io.param_template(CFG))


def _mean():
  return np.random.default_rng(1).uniform(50, 180, (68, 2)).astype(np.float32)


def test_round_trip_float32(tmp_path):
  params = _params()
  meta = {"name": "t", "nme": np.float32(4.5), "steps": np.int64(3), "tuple": (1, 2)}
  model_io.save_model(tmp_path / "m", params, CFG, _mean(), meta)
  m = model_io.load_model(tmp_path / "m")
  assert m.model_config == CFG and m.dtype == "float32"
  np.testing.assert_array_equal(m.mean_shape, _mean())
  assert m.metadata == {"name": "t", "nme": 4.5, "steps": 3, "tuple": [1, 2]}
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(m.params)):
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(params) == jax.tree.structure(m.params)


def test_round_trip_bfloat16_halves_the_size(tmp_path):
  params = _params()
  model_io.save_model(tmp_path / "f32", params, CFG, _mean(), {})
  model_io.save_model(tmp_path / "bf16", params, CFG, _mean(), {}, dtype="bfloat16")
  m = model_io.load_model(tmp_path / "bf16")
  assert m.dtype == "bfloat16"
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(m.params)):
    assert b.dtype == np.float32
    np.testing.assert_array_equal(b, a.astype(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_allclose(b, a, rtol=2 ** -8, atol=1e-30)
  size = lambda d: (tmp_path / d / model_io.PARAMS_FILE).stat().st_size
  assert size("bf16") < 0.55 * size("f32")


def test_refuses_bad_inputs_and_files(tmp_path):
  params = _params()
  with pytest.raises(ValueError, match="dtype"):
    model_io.save_model(tmp_path / "x", params, CFG, _mean(), {}, dtype="float16")
  with pytest.raises(ValueError, match="mean_shape"):
    model_io.save_model(tmp_path / "x", params, CFG, _mean()[:10], {})
  other = ModelConfig(num_landmarks=68, patch_indices=tuple(range(0, 68, 2)), hidden_size=32)
  with pytest.raises(ValueError, match="shape"):
    model_io.save_model(tmp_path / "x", params, other, _mean(), {})
  bad = jax.tree.map(lambda x: x, params)
  bad["head"]["bias"] = bad["head"]["bias"].copy()
  bad["head"]["bias"][0, 0] = np.nan
  with pytest.raises(ValueError, match="non-finite"):
    model_io.save_model(tmp_path / "x", bad, CFG, _mean(), {})

  with pytest.raises(FileNotFoundError, match="not a directory"):
    model_io.load_model(tmp_path / "nothing")
  d = model_io.save_model(tmp_path / "m", params, CFG, _mean(), {})
  # A swapped parameter file fails the checksum.
  model_io.save_model(tmp_path / "m2", _params(5), CFG, _mean(), {})
  (d / model_io.PARAMS_FILE).write_bytes((tmp_path / "m2" / model_io.PARAMS_FILE).read_bytes())
  with pytest.raises(ValueError, match="checksum"):
    model_io.load_model(d)
  # A config that does not fit the arrays names the array.
  d = model_io.save_model(tmp_path / "m3", params, CFG, _mean(), {})
  info = json.loads((d / model_io.CONFIG_FILE).read_text())
  info["model_config"]["hidden_size"] = 64
  (d / model_io.CONFIG_FILE).write_text(json.dumps(info))
  with pytest.raises(ValueError, match="model_sha256"):    # model.json's own checksum
    model_io.load_model(d)
  del info["model_sha256"]                                  # as a model exported before it
  (d / model_io.CONFIG_FILE).write_text(json.dumps(info))
  with pytest.raises(ValueError, match="the config needs"):
    model_io.load_model(d)
  (d / model_io.PARAMS_FILE).unlink()
  with pytest.raises(FileNotFoundError, match="params.npz"):
    model_io.load_model(d)


def test_predictor_from_saved_model(tmp_path):
  from musica_jax import predictor
  model_io.save_model(tmp_path / "m", _params(), CFG, _mean(), {"name": "x"}, dtype="bfloat16")
  p = predictor.Predictor.from_saved_model(tmp_path / "m")
  assert p.model_config == CFG and p.metadata["name"] == "x"
  assert p.metadata["param_dtype"] == "bfloat16"
