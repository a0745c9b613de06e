r"""What is the cascade looking at? (paper section 3.5, Figure 6)

  python -m experiments.attention_map --flagfile=300w68.flags (--workdir=W | --model=DIR|default) \
      --output=attention.png [--output_json=attention.json] [--eval_split=common]
      [--checkpoint=STEP]

Runs the model over the evaluation split (experiments.eval_lib, the same code as
experiments.evaluate) and averages each patch's local attention (the sigmoid gates of
paper Eq. 2, already averaged over the 256 descriptor components by the model) over all
faces and iterations, and per iteration. The PNG draws the averages at the patches'
positions on the mean face (the cascade's initial shape): one panel for all iterations,
one per iteration. The JSON lists every patch (landmark, face part, attention) and where
the maximum is (the paper finds it on the upper nose).
"""
from __future__ import annotations

import os
import pathlib
import sys

from absl import app
from absl import flags
import numpy as np

from experiments import common
from experiments import config_flags
from musica_jax import atomic_io
from musica_jax import run_config
from musica_jax import schemes as schemes_lib
from musica_jax import strict_json

FLAGS = flags.FLAGS


def define_flags():
  """Defined when run as a program (importing the module defines none); the data flags
  are experiments.config_flags', so the training flagfiles work here."""
  d = common.define_flag
  d("string", "output", None, "PNG to write (Figure 6).")
  d("string", "output_json", None, "JSON to write (default: next to --output).")
  d("string", "checkpoint", "latest", "Checkpoint step, or 'latest'.")
  d("string", "model", None, "An exported model directory (experiments.export_model) "
    "instead of --workdir; 'default' = the model shipped in musica_jax/default_model.")


def part_of(scheme: schemes_lib.LandmarkScheme, landmark: int) -> str:
  for name, idx in scheme.groups.items():
    if landmark in idx:
      return name
  return "?"


def summarise_attention(attention, patch_indices, scheme: schemes_lib.LandmarkScheme) -> dict:
  """attention [S, F, P] (mean gate per patch) -> the JSON summary."""
  att = np.asarray(attention, np.float64)
  if att.ndim != 3 or att.shape[-1] != len(patch_indices):
    raise ValueError(f"attention must be [S, F, {len(patch_indices)}], got {att.shape}")
  overall = att.mean(axis=(0, 1))
  per_iter = att.mean(axis=1)
  def where_max(v):
    p = int(np.argmax(v))
    lm = int(patch_indices[p])
    return {"patch": p, "landmark": lm, "part": part_of(scheme, lm), "attention": float(v[p]),
            "relative_to_mean": float(v[p] / v.mean())}
  parts = {}
  for p, lm in enumerate(patch_indices):
    parts.setdefault(part_of(scheme, int(lm)), []).append(overall[p])
  part_means = {k: float(np.mean(v)) for k, v in parts.items()}
  order = np.argsort(-overall)
  return {
      "faces": int(att.shape[1]), "iterations": int(att.shape[0]),
      "maximum": where_max(overall),
      "maximum_per_iteration": [where_max(v) for v in per_iter],
      "minimum": {"patch": int(np.argmin(overall)),
                  "landmark": int(patch_indices[int(np.argmin(overall))]),
                  "part": part_of(scheme, int(patch_indices[int(np.argmin(overall))])),
                  "attention": float(overall.min())},
      "mean_attention": float(overall.mean()),
      "parts_by_mean_attention": dict(sorted(part_means.items(), key=lambda kv: -kv[1])),
      "top5": [{"landmark": int(patch_indices[p]), "part": part_of(scheme, int(patch_indices[p])),
                "attention": float(overall[p])} for p in order[:5]],
      "patches": [{"patch": p, "landmark": int(lm), "part": part_of(scheme, int(lm)),
                   "attention": float(overall[p]),
                   "per_iteration": [float(x) for x in per_iter[:, p]]}
                  for p, lm in enumerate(patch_indices)],
  }


def render(path, attention, mean_shape, patch_indices, scheme, title: str = "") -> None:
  """Figure 6: attention at the mean-face patch positions; all iterations + each one."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  att = np.asarray(attention, np.float64)
  panels = [("all iterations", att.mean(axis=(0, 1)))]
  panels += [(f"iteration {s + 1}", att[s].mean(0)) for s in range(att.shape[0])]
  lo = min(v.min() for _, v in panels)
  hi = max(v.max() for _, v in panels)
  mean_shape = np.asarray(mean_shape, np.float64)
  pts = mean_shape[list(patch_indices)]
  marker = 1.0 if len(patch_indices) <= 24 else 0.4    # 68/98 patches: smaller discs
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.8),
                           constrained_layout=True)
  axes = np.atleast_1d(axes)
  for ax, (name, v) in zip(axes, panels):
    for idx in scheme.groups.values():       # the mean face as thin lines
      g = mean_shape[list(idx)]
      ax.plot(g[:, 0], g[:, 1], "-", color="0.8", lw=0.8, zorder=1)
    ax.scatter(mean_shape[:, 0], mean_shape[:, 1], s=4, c="0.6", zorder=2)
    size = marker * (40 + 260 * (v - lo) / max(hi - lo, 1e-9))
    sc = ax.scatter(pts[:, 0], pts[:, 1], c=v, s=size,
                    cmap="inferno", vmin=lo, vmax=hi, edgecolors="k", linewidths=0.4,
                    zorder=3)
    p = int(np.argmax(v))
    ax.scatter(pts[p, 0], pts[p, 1], s=420 * marker, facecolors="none", edgecolors="c",
               linewidths=1.6, zorder=4)
    lm = int(patch_indices[p])
    ax.set_title(f"{name}\nmax: landmark {lm} ({part_of(scheme, lm)}) {v[p]:.3f}", fontsize=9)
    ax.set_aspect("equal")
    ax.invert_yaxis()
    ax.set_xticks([])
    ax.set_yticks([])
  fig.colorbar(sc, ax=axes.tolist(), shrink=0.8, label="mean patch attention")
  if title:
    fig.suptitle(title, fontsize=10)
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def attention_map(workdir, data_cfg, output, output_json=None, checkpoint="latest",
                  model=None) -> dict:
  from experiments import eval_lib  # noqa: PLC0415
  from musica_jax import parallel  # noqa: PLC0415
  loaded = common.load_model(workdir, model, checkpoint)
  params, cfg, mean_shape = loaded.params, loaded.model_config, loaded.mean_shape
  info = common.model_provenance(loaded)
  source = f"--workdir={workdir}" if workdir else f"--model={model}"
  if not cfg.use_attention:
    raise app.UsageError(f"{source}: this model has no patch attention "
                         f"(use_attention=False)")
  if data_cfg.num_points != cfg.num_landmarks:
    raise app.UsageError(f"--num_points={data_cfg.num_points} but the model has "
                         f"{cfg.num_landmarks} landmarks")
  scheme = schemes_lib.get_scheme(cfg.num_landmarks)
  mesh = parallel.make_mesh()
  split = data_cfg.eval_split.split(",")[0]
  per = eval_lib.run_split(parallel.replicate(params, mesh), data_cfg, split, cfg, scheme,
                           mean_shape, mesh, keep_landmarks=True)
  summary = summarise_attention(per["attention"], cfg.patch_indices, scheme)
  result = {"workdir": os.path.abspath(workdir) if workdir else None,
            "model_path": info.get("model_path"), "checkpoint_step": info["checkpoint_step"],
            "dataset": data_cfg.dataset, "split": split,
            "model": {"landmarks": cfg.num_landmarks, "patches": cfg.num_patches},
            "command": "python -m experiments.attention_map " + " ".join(sys.argv[1:]),
            **summary}
  title = (f"{data_cfg.dataset} {split}, {summary['faces']} faces; {cfg.num_landmarks} pts / "
           f"{cfg.num_patches} patches, step {info['checkpoint_step']}")
  render(output, per["attention"], mean_shape, cfg.patch_indices, scheme, title)
  out_json = output_json or str(pathlib.Path(output).with_suffix(".json"))
  atomic_io.write_text(out_json, strict_json.dumps(result, indent=1))
  m = summary["maximum"]
  print(f"{summary['faces']} faces: maximum attention {m['attention']:.4f} at patch {m['patch']} "
        f"= landmark {m['landmark']} ({m['part']}), {m['relative_to_mean']:.2f}x the mean; "
        f"parts: {summary['parts_by_mean_attention']}")
  print(f"wrote {output} and {out_json}")
  return result


def main(argv):
  common.start(argv)
  if bool(FLAGS.workdir) == bool(FLAGS.model):
    raise app.UsageError(common.MODEL_SOURCES)
  if not FLAGS.output:
    raise app.UsageError("--output=PNG is required")
  try:
    run = run_config.load(FLAGS.workdir) if FLAGS.workdir else {}
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(f"--workdir={FLAGS.workdir}: {e}") from e
  overrides = {}
  if not FLAGS["dataset"].present:     # default to the run's own evaluation data
    for k in ("dataset", "data_dir", "num_points", "eval_split", "tfds_dir",
              "synthetic_train_size", "synthetic_test_size", "synthetic_image_size",
              "synthetic_seed"):
      if k in run.get("data", {}) and not FLAGS[k].present:
        overrides[k] = run["data"][k]
  data_cfg = config_flags.data_config_from_flags(**overrides)
  attention_map(FLAGS.workdir, data_cfg, FLAGS.output, FLAGS.output_json, FLAGS.checkpoint,
                FLAGS.model)


if __name__ == "__main__":
  define_flags()
  common.run(main)
