"""experiments.estimate_flip_shift's summary: which frame the x offset is constant in."""
import numpy as np
import pytest

from experiments import estimate_flip_shift as efs


def _faces(delta_image=None, delta_crop=None):
  rng = np.random.default_rng(0)
  ids, scales = [], []
  for folder, scale in (("lfpw/trainset", 1.2), ("helen/trainset", 0.5), ("afw", 0.9)):
    ids += [f"{folder}/{i}" for i in range(400)]
    scales += list(rng.normal(scale, 0.1, 400).clip(0.2))
  scale = np.asarray(scales)
  noise = rng.normal(0, 0.05, (len(ids), 2))
  x = np.full(len(ids), -delta_image) if delta_image is not None else -delta_crop / scale
  return ids, {"image_px": noise + np.stack([x, np.zeros_like(x)], 1), "crop_scale": scale}


@pytest.mark.parametrize("frame", ["image_px", "crop_px"])
def test_picks_the_frame_where_the_offset_is_constant(frame):
  ids, res = _faces(**({"delta_image": 0.5} if frame == "image_px" else {"delta_crop": 0.5}))
  out = efs.summarise(ids, res)
  assert out["more_constant_frame"] == frame
  assert set(out["per_folder"]) == {"lfpw/trainset", "helen/trainset", "afw"}
  assert out[f"delta_{frame.split('_')[0]}_px"] == pytest.approx(0.5, abs=0.01)
  fit = out["fit_crop_x_vs_scale"]
  if frame == "image_px":   # residual_crop = -0.5 * scale: a = 0, b = -0.5
    assert fit["a_crop_px"] == pytest.approx(0, abs=0.03)
    assert fit["b_image_px"] == pytest.approx(-0.5, abs=0.03)
  else:
    assert fit["b_image_px"] == pytest.approx(0, abs=0.03)
