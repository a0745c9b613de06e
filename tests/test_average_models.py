"""Weight averaging of exported models (`experiments.average_models`, a "model soup" of
fine-tunes from one start): the weighted mean of each array, the weights' checks, models
that cannot be averaged refused; the program writes a loadable model naming its sources."""
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import average_models
from musica_jax import model_io
from musica_jax.config import ModelConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
CFG = ModelConfig(num_landmarks=68, patch_indices=tuple(range(0, 68, 4)), hidden_size=32)
MEAN = np.random.default_rng(1).uniform(50, 180, (68, 2)).astype(np.float32)


def _model(tmp_path, name, seed, cfg=CFG, mean=MEAN):
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32),
                        model_io.param_template(cfg))
  return model_io.load_model(model_io.save_model(tmp_path / name, params, cfg, mean, {}))


def test_the_average_is_the_weighted_mean_of_every_array(tmp_path):
  a, b = _model(tmp_path, "a", 0), _model(tmp_path, "b", 1)
  soup = average_models.average([a, b], [0.25, 0.75])
  for x, y, z in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params),
                     jax.tree.leaves(soup)):
    np.testing.assert_allclose(z, 0.25 * x + 0.75 * y, rtol=1e-6, atol=1e-7)
    assert z.dtype == np.float32
  # Averaging a model with itself gives it back.
  same = average_models.average([a, a], [0.5, 0.5])
  for x, z in zip(jax.tree.leaves(a.params), jax.tree.leaves(same)):
    np.testing.assert_allclose(z, x, rtol=1e-6)


def test_weights_are_normalised_and_checked():
  assert average_models.normalised_weights([], 4) == [0.25] * 4
  assert average_models.normalised_weights(["1", "3"], 2) == [0.25, 0.75]
  for bad in (["1"], ["1", "-1"], ["0", "0"], ["nan", "1"], ["x", "1"]):
    with pytest.raises(ValueError):
      average_models.normalised_weights(bad, 2)


def test_models_that_cannot_be_averaged_are_refused(tmp_path):
  a = _model(tmp_path, "a", 0)
  other = ModelConfig(num_landmarks=68, patch_indices=tuple(range(0, 68, 2)), hidden_size=32)
  with pytest.raises(ValueError, match="config differs"):
    average_models.average([a, _model(tmp_path, "b", 1, cfg=other)], [0.5, 0.5])
  with pytest.raises(ValueError, match="mean shape differs"):
    average_models.average([a, _model(tmp_path, "c", 1, mean=MEAN + 3)], [0.5, 0.5])
  with pytest.raises(ValueError, match="at least two"):
    average_models.average([a], [1.0])


def test_a_model_the_first_grew_from_is_grown_before_averaging(tmp_path):
  from musica_jax import factorise  # noqa: PLC0415
  big_cfg = ModelConfig(num_landmarks=68, patch_indices=tuple(range(0, 68, 2)), hidden_size=32)
  big, small = _model(tmp_path, "big", 0, cfg=big_cfg), _model(tmp_path, "small", 1)
  soup = average_models.average([big, small], [0.5, 0.5])
  grown = factorise.convert_params(small.params, CFG, big_cfg)[0]
  for x, y, z in zip(jax.tree.leaves(big.params), jax.tree.leaves(grown),
                     jax.tree.leaves(soup)):
    np.testing.assert_allclose(z, 0.5 * x + 0.5 * y, rtol=1e-6, atol=1e-7)
  # The new patches' recurrent rows are half the big model's (the small one has zeros).
  d = big_cfg.descriptor_size
  new = big_cfg.patch_indices.index(2)          # landmark 2: not a patch of the small model
  rows = slice(new * d, (new + 1) * d)
  np.testing.assert_allclose(soup["recurrent"]["kernel"][:, rows],
                             0.5 * big.params["recurrent"]["kernel"][:, rows], rtol=1e-6)


def test_the_program_writes_a_model_that_names_its_sources(tmp_path):
  a, b = _model(tmp_path, "a", 0), _model(tmp_path, "b", 1)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  out = tmp_path / "soup"
  proc = subprocess.run([sys.executable, "-m", "experiments.average_models",
                         f"--models={a.path},{b.path}", "--weights=1,1", f"--output={out}",
                         "--name=soup"], cwd=REPO, env=env, text=True, capture_output=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  soup = model_io.load_model(out)
  assert soup.metadata["name"] == "soup"
  # (paths are stored as the metadata redacts them: the folder's name is kept)
  assert [s["model"].rsplit("/", 1)[-1] for s in soup.metadata["averaged_from"]] == ["a", "b"]
  assert [s["weight"] for s in soup.metadata["averaged_from"]] == [0.5, 0.5]
  # The results JSONs (robust_val, evaluate) record the ingredients.
  from experiments import common  # noqa: PLC0415
  assert [x["weight"] for x in common.model_provenance(soup)["averaged_from"]] == [0.5, 0.5]
  x, y, z = (jax.tree.leaves(m.params)[0] for m in (a, b, soup))
  np.testing.assert_allclose(z, (x + y) / 2, rtol=1e-6, atol=1e-7)
  bad = subprocess.run([sys.executable, "-m", "experiments.average_models",
                        f"--models={a.path},{tmp_path / 'missing'}", f"--output={out}2"],
                       cwd=REPO, env=env, text=True, capture_output=True, timeout=300)
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  assert bad.stderr.strip().count("\n") == 0 and "missing" in bad.stderr
