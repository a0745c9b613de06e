r"""Chooses an exported model's default failure threshold Tf on a validation split.

  python -m experiments.choose_t_fail --flagfile=300w19.flags --model=default --eval_split=val \
      --output_json=results/default_t_fail_300w19_val.json [--install]

A face is "valid" when its final estimated error E is below Tf. With no Tf every output is
valid, so the quality score guards nothing; this command gives the model a default.

Rule (on the validation faces, full cascade): Tf = --t_fail_margin x the largest E among the
faces the model aligned (inter-ocular NME <= --fail_nme): every aligned validation face
stays valid, and anything the model rates worse than all of them is flagged. The JSON says
what that Tf flags on the same split: the failed faces, and three kinds of inputs with no
usable face (blank crops, noise crops, and the validation crops shifted by half the crop so
the face is off-centre). --install writes Tf into the model's model.json (`default_t_fail`,
with this rule and its numbers), which `Predictor.predict` and `experiments.predict` use
when no --t_fail is given. Never choose it on a test split.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import input_pipeline
from experiments import common
from experiments import config_flags
from experiments import eval_lib
from experiments import evaluate   # its flags (--model, --output_json)
from musica_jax import cascade
from musica_jax import model_io
from musica_jax import schemes

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when run as a program): experiments.evaluate's
  (--model, --output_json, ...) and its own."""
  evaluate.define_flags()
  d = common.define_flag
  d("float", "fail_nme", 0.08, "A validation face is aligned when its inter-ocular NME "
    "is at most this.")
  d("float", "t_fail_margin", 1.05, "Tf = this x the largest estimated error of an "
    "aligned validation face.")
  d("bool", "install", False, "Write the chosen Tf into the model's model.json.")


TEST_SPLITS = ("test", "common", "challenging", "full")


def choose_t_fail(estimated, nme, fail_nme: float, margin: float) -> float:
  """The rule: margin x max estimated error over the aligned faces (nme <= fail_nme)."""
  estimated, nme = np.asarray(estimated, np.float64), np.asarray(nme, np.float64)
  aligned = np.isfinite(nme) & (nme <= fail_nme) & np.isfinite(estimated)
  if not aligned.any():
    raise ValueError(f"no validation face has NME <= {fail_nme}: no Tf can be chosen")
  return float(margin * estimated[aligned].max())


def no_face_inputs(images: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
  """Crops that hold no usable face, made from a batch of real (standardised) crops."""
  rng = np.random.default_rng(seed)
  size = images.shape[1]
  return {"blank": np.zeros_like(images),
          "noise": rng.normal(0.0, 1.0, images.shape).astype(images.dtype),
          "shifted_half_crop": np.roll(images, size // 2, axis=2)}


def main(argv):
  common.start(argv)
  if FLAGS.workdir:
    raise app.UsageError("--workdir: choose_t_fail works on an exported model; give --model")
  model = FLAGS.model or "default"
  data_cfg = config_flags.data_config_from_flags()
  split = data_cfg.eval_split.split(",")[0]
  if split in TEST_SPLITS:
    raise app.UsageError(f"--eval_split={split} is a test split; choose Tf on a validation "
                         f"split (e.g. val)")
  common.finite_flag("fail_nme", FLAGS.fail_nme, positive=True)
  common.finite_flag("t_fail_margin", FLAGS.t_fail_margin, positive=True)
  loaded = common.load_model(None, model)
  cfg, mean_shape = loaded.model_config, loaded.mean_shape
  info, (params, mesh) = common.model_provenance(loaded), eval_lib.on_devices(loaded)
  scheme = schemes.get_scheme(cfg.num_landmarks)
  per_face = eval_lib.run_split(params, data_cfg, split, cfg, scheme, mean_shape, mesh)
  estimated = per_face["estimated_error"][-1]
  nme = per_face["nme_interocular_per_iteration"][-1]
  t_fail = choose_t_fail(estimated, nme, FLAGS.fail_nme, FLAGS.t_fail_margin)
  failed = ~(nme <= FLAGS.fail_nme)

  images = next(iter(input_pipeline.eval_iterator(data_cfg, split)))["image"]
  run = jax.jit(lambda p, x: cascade.run_cascade(p, x, jnp.asarray(mean_shape), cfg).errors[-1])
  flagged_no_face = {}
  for name, crops in no_face_inputs(np.asarray(images)).items():
    e = np.asarray(run(params, crops))
    flagged_no_face[name] = {"crops": int(e.size), "flagged": float(np.mean(~(e < t_fail))),
                             "median_estimated_error": float(np.median(e))}
  how = {"rule": f"{FLAGS.t_fail_margin:g} x the largest final estimated error of the "
                 f"{split} faces with inter-ocular NME <= {FLAGS.fail_nme:g} (full cascade)",
         "dataset": data_cfg.dataset, "split": split, "faces": int(nme.size),
         "failed_faces": int(failed.sum()),
         "flagged_faces": float(np.mean(~(estimated < t_fail))),
         "failed_faces_flagged": (float(np.mean(~(estimated[failed] < t_fail)))
                                  if failed.any() else None),
         "estimated_error_percentiles_50_90_99": np.percentile(estimated, [50, 90, 99]).tolist(),
         "flagged_no_face_inputs": flagged_no_face,
         "command": "python -m experiments.choose_t_fail " + " ".join(sys.argv[1:])}
  result = {**info, "default_t_fail": t_fail, "chosen": how}
  print(f"Tf = {t_fail:.5f} on {split} ({how['faces']} faces, {how['failed_faces']} failed): "
        f"flags {how['flagged_faces'] * 100:.1f}% of them; no-face crops flagged: "
        + ", ".join(f"{k} {v['flagged'] * 100:.0f}%" for k, v in flagged_no_face.items()))
  if FLAGS.output_json:
    common.write_json(FLAGS.output_json, result)
  if FLAGS.install:
    path = loaded.path
    model_io.set_default_t_fail(path, t_fail, how)
    print(f"installed default_t_fail={t_fail:.5f} in {path}/{model_io.CONFIG_FILE}")


if __name__ == "__main__":
  define_flags()
  common.run(main)
