"""The deployment measurements of experiments.deploy_benchmark, flag-free:
`run(DeployConfig)` returns the result dict, one section per entry (see the entry point's
docstring for what each section measures). Tests call the pieces in-process."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

from absl import app
import numpy as np

from experiments import common
from experiments import peers_lib
from experiments import predict_lib
from musica_jax import face_frame
from musica_jax import images as images_lib
from musica_jax import metrics
from musica_jax import predictor as predictor_lib
from musica_jax import schemes

SECTIONS = ("folder", "latency", "batch", "detector", "video")


@dataclasses.dataclass(frozen=True)
class DeployConfig:
  """The flags of experiments.deploy_benchmark."""
  data_dir: str
  split: str = "common"
  sections: tuple[str, ...] = SECTIONS
  model: str = "default"
  max_faces: int = 0
  latency_faces: int = 100
  latency_rounds: int = 3
  latency_ts: tuple[str, ...] = ()
  latency_budgets: tuple[str, ...] = ("2.75", "2.5")
  dlib_box_fit_json: str = "results/dlib_300w_common.json"
  video_frames: int = 60
  video_t_fail: float = 0.08
  compilation_cache: str = ""
  savedmodel: str | None = None
  batch_size: int = 64
  batch_rounds: int = 5
  batch_budgets: tuple[str, ...] = ("2.0",)


def _nme(pred, gt, kind="interpupil"):
  return metrics.per_face_nme_numpy(pred, gt, schemes.IBUG68, kind)


# ---------------------------------------------------------------------------------------


def folder_section(model, items, images) -> dict:
  """First pass of a fresh predictor vs the warm pass, photo by photo."""
  t0 = time.perf_counter()
  pred = _load(model)
  load_s = time.perf_counter() - t0
  passes, first_face = [], None
  for _ in range(2):
    t0 = time.perf_counter()
    for it, im in zip(items, images):
      pred.predict(im, it.box)
      if first_face is None:
        first_face = time.perf_counter() - t0
    passes.append(time.perf_counter() - t0)
  sizes = {im.shape[:2] for im in images}
  n = len(items)
  return {"faces": n, "distinct_photo_sizes": len(sizes), "load_seconds": load_s,
          "first_face_seconds (compilation or cache load)": first_face,
          "first_pass_seconds": passes[0], "warm_pass_seconds": passes[1],
          "first_ms_per_face": 1e3 * passes[0] / n, "warm_ms_per_face": 1e3 * passes[1] / n,
          "first_over_warm": passes[0] / passes[1]}


def _load(model):
  return predictor_lib.Predictor.from_loaded(common.load_model(None, model))


def budget_kwargs(b: str) -> dict:
  """A budget flag value as predict's keyword: mean iterations ("2.5") or MMACs per face
  ("27.7mmacs": budget_mmacs, which picks the schedule that serves it and may escalate)."""
  text = str(b).strip().lower()
  try:
    return ({"budget_mmacs": float(text[:-5])} if text.endswith("mmacs")
            else {"budget": float(text)})
  except ValueError:
    raise ValueError(f"a budget is mean iterations (2.5) or MMACs per face (27.7mmacs), "
                     f"got {b!r}") from None


def _model_paths(pred, items, images, ts_list, budgets, savedmodel) -> dict:
  """{name: f -> (landmarks of face f or None, iterations)} of our paths at batch 1."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from musica_jax import cascade  # noqa: PLC0415
  from musica_jax import fast_inference  # noqa: PLC0415
  from musica_jax import portable  # noqa: PLC0415
  exp = jax.export.deserialize(portable.export_stablehlo(pred.params, pred.model_config,
                                                         pred.mean_shape))
  bf16 = fast_inference.FastCascade(pred.params, pred.model_config, weight_dtype=jnp.bfloat16)
  framed = [pred.crops(im, it.box)[:3] for it, im in zip(items, images)]  # crop, scale, offset
  init = jnp.asarray(pred.mean_shape)

  def predict_path(**kw):
    if "budget_mmacs" in kw:   # each call on its own: a stream would not escalate
      def run_mmacs(f):
        out = pred.predict(images[f], items[f].box, **kw)
        return out.landmarks[0], int(out.iterations[0])
      return run_mmacs
    stream = pred.stream(budget=kw.pop("budget", None))   # face by face: a budget's stream

    def run(f):
      out = stream.predict(images[f], items[f].box, **kw)
      return out.landmarks[0], int(out.iterations[0])
    return run

  def crop_only(fn):
    def run(f):
      crop, scale, offset = framed[f]
      lm = fn(crop)
      return face_frame.from_crop(np.asarray(lm, np.float64), scale, offset)[0], 3
    return run

  paths = {"full (predict, crop incl.)": predict_path(),
           **{f"ts {t} (predict)": predict_path(ts=float(t)) for t in ts_list},
           **{f"budget {b} (predict)": predict_path(**budget_kwargs(b)) for b in budgets},
           "crop alone (host)": lambda f: (pred.crops(images[f], items[f].box), None)[1:],
           "full, crop given (Predictor.run_fast)": crop_only(
               lambda c: pred.run_fast(c)["landmarks"]),
           "full, crop given, masked scan (cascade.run_cascade_jit)": crop_only(
               lambda c: np.asarray(cascade.run_cascade_jit(
                   pred.params, c, init, pred.model_config).landmarks)),
           "full, crop given, bf16 recurrent+head weights": crop_only(
               lambda c: np.asarray(bf16.run(c, init).landmarks)),
           "full, crop given, exported StableHLO": crop_only(
               lambda c: np.asarray(exp.call(c)[0]))}
  if jax.default_backend() != "cpu":   # the masked program (small batches there) vs selective
    def selective(run):
      def timed(f):
        keep, fast_inference.MASKED_MAX_BATCH_ACCELERATOR = (
            fast_inference.MASKED_MAX_BATCH_ACCELERATOR, 0)
        try:
          return run(f)
        finally:
          fast_inference.MASKED_MAX_BATCH_ACCELERATOR = keep
      return timed
    paths.update({f"budget {b} (predict, selective program)": selective(
        predict_path(**budget_kwargs(b))) for b in budgets})
  paths.update(_profile_paths(pred, items, images))
  if savedmodel:
    import tensorflow as tf  # noqa: PLC0415
    serve = tf.saved_model.load(savedmodel).signatures["serving_default"]
    paths["full, crop given, TensorFlow SavedModel"] = crop_only(
        lambda c: serve(crops=tf.constant(c))["landmarks"].numpy())
  return paths


PROFILE = "profile: "


def _profile_paths(pred, items, images) -> dict:
  """The pieces of a batch-1 `predict` (full cascade), timed beside it: where its time
  goes. Each piece is called on its own (its inputs made beforehand), so the pieces add
  up to about the whole; what is left is Python, checks and transfers."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from musica_jax import cascade  # noqa: PLC0415
  from musica_jax import crop as crop_lib  # noqa: PLC0415
  cfg, fast = pred.model_config, pred.fast
  frames = [images_lib.face_frames(im, it.box) for it, im in zip(items, images)]
  prep = lambda f: crop_lib.prepare(frames[f][0], frames[f][1], frames[f][3], frames[f][4],
                                    cfg.image_size)
  sources = [jax.device_put(prep(f).arrays()) for f in range(len(items))]
  num_levels = max(cfg.levels) + 1
  levels_of = jax.jit(lambda a: crop_lib.crop_levels(a, num_levels))
  levels = [levels_of(a) for a in sources]
  shape0 = cascade.broadcast_init(pred.init_shape, 1, cfg)
  hidden0 = jnp.zeros((1, cfg.hidden_size), jnp.float32)

  def stage_fn(i):
    xs = {k: v for k, v in cascade.stage_xs(cfg, i).items() if k != "origin"}
    return jax.jit(lambda p, level, shape, hidden: cascade.stage_forward(
        cfg, p, level, shape, hidden, xs)[:3])
  stages = [stage_fn(i) for i in range(cfg.num_stages)]
  tiny = jax.jit(lambda x: x + 1)
  one = jnp.zeros((1,), jnp.float32)
  done = lambda x: (jax.block_until_ready(x), None)[1:]
  paths = {
      f"{PROFILE}host: face frame (checks, box -> crop frame)":
          lambda f: (images_lib.face_frames(images[f], items[f].box), None)[1:],
      f"{PROFILE}host: crop source (crop.prepare)": lambda f: (prep(f), None)[1:],
      f"{PROFILE}device program, sources on the device (crop + pyramid + iterations)":
          lambda f: done(fast.run_sources(sources[f], pred.init_shape)),
      f"{PROFILE}device: crop + pyramid alone": lambda f: done(levels_of(sources[f])),
      f"{PROFILE}a trivial jitted call (dispatch floor)": lambda f: done(tiny(one))}
  for i in range(cfg.num_stages):
    level = cfg.levels[i]
    paths[f"{PROFILE}device: iteration {i + 1} alone (level {level}, {cfg.patches_per_stage[i]} "
          f"patches)"] = (lambda f, i=i, level=level: done(stages[i](
              fast.stage_params[i], levels[f][level], shape0, hidden0)))
  return paths


def _dlib_paths(items, images, box_fit_json) -> dict:
  """dlib's shape predictor (its box mapped from the landmark box) and HOG detector; none
  (said once) without dlib or the box fit."""
  from musica_jax import detector as detector_lib  # noqa: PLC0415
  try:
    dlib = detector_lib.import_dlib()
    mapping = detector_lib.BoxMapping(**json.load(open(box_fit_json))["box_fit"]["mapping"])
    sp = dlib.shape_predictor(str(peers_lib.find_dlib_model()))
    hog = dlib.get_frontal_face_detector()
  except (ImportError, OSError, KeyError, FileNotFoundError) as e:
    print(f"latency: no dlib rows ({e})")
    return {}
  rects = [peers_lib.box_to_rect(dlib, mapping.apply(it.box[None])[0]) for it in items]

  def ert(f):
    shape = sp(images[f], rects[f])
    return np.asarray([[shape.part(i).x, shape.part(i).y] for i in range(68)], float), None

  return {"dlib ERT 68 (shape predictor, its box given)": ert,
          "dlib HOG detector (per photo)": lambda f: (hog(images[f], 0), None)[1:]}


def _time_paths(paths: dict, faces: int, rounds: int):
  """Per face: every path `rounds` times back to back (the path order shuffled face by face,
  so no path always follows the same one: the HOG detector, for one, leaves the caches and
  thread pool cold), its fastest call kept (the machine is shared: the minimum is the least
  disturbed). ({name: [seconds per face]}, {name: (landmarks, iterations)})."""
  for run in paths.values():       # warm-up (compilation) outside the timing
    run(0)
  names = list(paths)
  order_rng = np.random.default_rng(0)
  fastest = {k: [] for k in names}
  results = {k: ([], []) for k in names}
  for f in range(faces):
    for j in order_rng.permutation(len(names)):
      k = names[j]
      best = np.inf
      for _ in range(rounds):
        t0 = time.perf_counter()
        out = paths[k](f)
        best = min(best, time.perf_counter() - t0)
      fastest[k].append(best)
      if out and out[0] is not None:
        results[k][0].append(out[0])
        results[k][1].append(out[1])
  return fastest, results


def latency_section(pred, items, images, ts_list, budgets, box_fit_json, rounds=3,
                    savedmodel=None) -> dict:
  """Batch 1 on each face: every path `rounds` times, the fastest kept; median over faces."""
  gt = np.stack([it.landmarks for it in items])
  paths = {**_model_paths(pred, items, images, ts_list, budgets, savedmodel),
           **_dlib_paths(items, images, box_fit_json)}
  fastest, results = _time_paths(paths, len(items), rounds)
  rows = {}
  for k in paths:
    rows[k] = {"median_ms": 1e3 * float(np.median(fastest[k]))}
    lms, its = results[k]
    if lms:
      rows[k]["nme_interpupil"] = 100 * float(_nme(np.stack(lms), gt).mean())
      if its and its[0] is not None:
        rows[k]["mean_iterations"] = float(np.mean(its))
  full = rows["full (predict, crop incl.)"]["median_ms"]
  ert_key = "dlib ERT 68 (shape predictor, its box given)"
  for r in rows.values():
    r["over_full"] = r["median_ms"] / full
    if ert_key in rows:
      r["over_dlib_ert"] = r["median_ms"] / rows[ert_key]["median_ms"]
  return {"faces": len(items), "rounds": rounds, "rows": rows,
          "timing": "batch 1; per face every path `rounds` times back to back (order "
                    "shuffled face by face), the fastest call kept; median over faces"}


def batch_section(model, items, images, batch: int, budgets, rounds: int) -> dict:
  """Photos to landmarks in batches of `batch` faces: Predictor.predict (photos + boxes;
  the host part of the crop, then the crop and the cascade in one program) against the
  cascade alone on the same faces' crops, made beforehand and already on the device
  (Predictor.run_fast), and each budget through predict; whole passes over the faces,
  the paths in a rotated order every round, each path's fastest and median pass."""
  import jax  # noqa: PLC0415
  pred = predictor_lib.Predictor.from_loaded(common.load_model(None, model), max_batch=batch)
  chunks = [(s, min(s + batch, len(items))) for s in range(0, len(items), batch)]
  boxes = [it.box for it in items]
  crops = [jax.block_until_ready(pred.crops(images[a:b], boxes[a:b])[0]) for a, b in chunks]
  paths = {"predict": lambda **kw: [pred.predict(images[a:b], boxes[a:b], **kw)
                                    for a, b in chunks],
           "cascade alone (run_fast, crops given)": lambda: [pred.run_fast(c) for c in crops]}
  paths.update({f"predict budget {x}": functools.partial(paths["predict"], **budget_kwargs(x))
                for x in budgets})
  outs = {k: run() for k, run in paths.items()}      # compilation outside the timing
  times = {k: [] for k in paths}
  names = list(paths)
  for r in range(rounds):
    for k in names[r % len(names):] + names[:r % len(names)]:
      t0 = time.perf_counter()
      paths[k]()
      times[k].append(time.perf_counter() - t0)
  n = len(items)
  gt = np.stack([it.landmarks for it in items])
  alone = min(times["cascade alone (run_fast, crops given)"])
  full, full_median = min(times["predict"]), float(np.median(times["predict"]))
  rows = {}
  for k in names:
    best, median = min(times[k]), float(np.median(times[k]))
    # The fastest pass, and the median one (steadier where the machine is noisy).
    rows[k] = {"ms_per_face": 1e3 * best / n, "faces_per_second": n / best,
               "over_cascade_alone": best / alone, "speedup_vs_predict": full / best,
               "ms_per_face_median": 1e3 * median / n,
               "speedup_vs_predict_median": full_median / median}
    if k.startswith("predict"):
      lm = np.concatenate([o.landmarks for o in outs[k]])
      rows[k]["nme_interpupil"] = 100 * float(_nme(lm, gt).mean())
      rows[k]["mean_iterations"] = float(np.concatenate([o.iterations for o in outs[k]]).mean())
  return {"faces": n, "batch": batch, "rounds": rounds, "backend": jax.default_backend(),
          "device": str(jax.devices()[0].device_kind), "rows": rows,
          "timing": "whole passes over the faces in batches, paths in rotated order each "
                    "round, fastest pass per path; decoding excluded"}


def detector_section(pred, items, images) -> dict:
  from musica_jax import detector as detector_lib  # noqa: PLC0415
  finder = detector_lib.FaceFinder(pred.model_config.num_landmarks)
  gt = np.stack([it.landmarks for it in items])
  det_boxes, found, secs = [], [], 0.0
  for it, im in zip(items, images):
    t0 = time.perf_counter()
    boxes = finder(im)
    secs += time.perf_counter() - t0
    k = detector_lib.match_detection(it.box, boxes)
    found.append(k is not None)
    det_boxes.append(boxes[k] if k is not None else it.box)
  found = np.asarray(found)
  by_gt = pred.predict(images, [it.box for it in items]).landmarks
  by_det = pred.predict(images, det_boxes).landmarks
  out = {"faces": len(items), "found": int(found.sum()), "fraction_found": float(found.mean()),
         "detector_ms_per_photo": 1e3 * secs / len(items),
         "match": "IoU >= 0.3 between the mapped detector box and the ground-truth box"}
  for name, lm in (("gt_boxes", by_gt), ("detector_boxes", by_det)):
    for kind in ("interpupil", "interocular"):
      e = _nme(lm, gt, kind)
      out[f"{name}_nme_{kind}_found"] = 100 * float(e[found].mean())
      if name == "gt_boxes":
        out[f"{name}_nme_{kind}_all"] = 100 * float(e.mean())
    out[f"{name}_fr_008_found"] = metrics.failure_rate(e[found], 0.08)   # e: inter-ocular
  return out


def synthetic_sequence(image, landmarks, frames: int, seed: int = 0):
  """A face moved, scaled and rotated frame by frame (smooth, random phases): (frames
  [T] HxWx3 uint8 of the photo's size, landmarks [T, N, 2] transformed the same way)."""
  from PIL import Image  # noqa: PLC0415
  rng = np.random.default_rng(seed)
  h, w = image.shape[:2]
  c = landmarks.mean(0)
  ph = rng.uniform(0, 2 * np.pi, 4)
  pil = Image.fromarray(image)
  out_frames, out_lm = [], []
  for t in range(frames):
    u = 2 * np.pi * t / max(frames, 1)
    angle = np.deg2rad(15 * np.sin(u + ph[0]))
    scale = 1.0 + 0.15 * np.sin(2 * u + ph[1])
    shift = np.array([0.12 * w * np.sin(u + ph[2]), 0.08 * h * np.sin(u + ph[3])])
    m = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    tr = c + shift - m @ c                          # p_out = m p + tr (pixel centres)
    minv = np.linalg.inv(m)
    # PIL's affine works in pixel-edge coordinates (centre + 0.5).
    off = -minv @ (tr + 0.5) + 0.5
    coeffs = (minv[0, 0], minv[0, 1], off[0], minv[1, 0], minv[1, 1], off[1])
    out_frames.append(np.asarray(pil.transform((w, h), Image.AFFINE, coeffs, Image.BILINEAR)))
    out_lm.append(landmarks @ m.T + tr)
  return out_frames, np.asarray(out_lm)


def video_section(pred, item, image, frames, t_fail) -> dict:
  from musica_jax import tracking  # noqa: PLC0415
  seq, gt = synthetic_sequence(image, item.landmarks, frames)
  tracker = tracking.FaceTracker(pred, t_fail=t_fail)
  nme, est, iters, redet, times = [], [], [], [], []
  for frame, g in zip(seq, gt):
    t0 = time.perf_counter()
    step = tracker.step(frame)
    times.append(time.perf_counter() - t0)
    p = step.prediction
    redet.append(step.redetected)
    if len(p):
      k = int(np.argmin([np.abs(p.landmarks[j] - g).mean() for j in range(len(p))]))
      nme.append(float(_nme(p.landmarks[k][None], g[None], "interocular")[0]))
      est.append(float(p.estimated_error[k]))
      iters.append(int(p.iterations[k]))
    else:
      nme.append(np.nan)
  nme = np.asarray(nme)
  return {"source_face": item.file_id, "frames": frames, "t_fail": t_fail,
          "redetections": int(tracker.redetections),
          "redetected_frames": [i for i, r in enumerate(redet) if r],
          "frames_without_face": int(np.isnan(nme).sum()),
          "nme_interocular_mean": 100 * float(np.nanmean(nme)),
          "nme_interocular_max": 100 * float(np.nanmax(nme)),
          "estimated_error_mean": float(np.mean(est)), "mean_iterations": float(np.mean(iters)),
          "ms_per_frame_median_after_first": 1e3 * float(np.median(times[1:]))}


def _latency(cfg: DeployConfig, pred, items, images) -> dict:
  n = cfg.latency_faces or len(items)
  step = max(1, len(items) // n)
  sel = list(range(0, len(items), step))[:n]
  out = latency_section(pred, [items[i] for i in sel], [images[i] for i in sel],
                        cfg.latency_ts, cfg.latency_budgets, cfg.dlib_box_fit_json,
                        cfg.latency_rounds, cfg.savedmodel)
  for k, v in out["rows"].items():
    print(f"latency {k}: {v}", flush=True)
  return out


def run(cfg: DeployConfig, command: str = "") -> dict:
  """The sections of `cfg` on the split's faces (the folder section first: nothing is
  compiled yet in this process)."""
  predict_lib.enable_compilation_cache(cfg.compilation_cache)
  if not cfg.data_dir or not os.path.isdir(cfg.data_dir):
    raise app.UsageError(f"--data_dir={cfg.data_dir}: not a directory (300W)")
  items = peers_lib.split_items(cfg.data_dir, cfg.split)
  if cfg.max_faces:
    items = items[:cfg.max_faces]
  images = [images_lib.read_image(it.image_path, exif_transpose=False) for it in items]
  result = {"command": command, "split": cfg.split, "model": cfg.model,
            "cpu_count": os.cpu_count()}
  if "folder" in cfg.sections:
    result["folder"] = folder_section(cfg.model, items, images)
    print("folder:", result["folder"], flush=True)
  pred = _load(cfg.model)
  try:
    if "latency" in cfg.sections:
      result["latency"] = _latency(cfg, pred, items, images)
    if "batch" in cfg.sections:
      result["batch"] = batch_section(cfg.model, items, images, cfg.batch_size,
                                      cfg.batch_budgets, cfg.batch_rounds)
      for k, v in result["batch"]["rows"].items():
        print(f"batch {cfg.batch_size} {k}: {v}", flush=True)
    if "detector" in cfg.sections:
      result["detector"] = detector_section(pred, items, images)
      print("detector:", result["detector"], flush=True)
    if "video" in cfg.sections:
      result["video"] = video_section(pred, items[0], images[0], cfg.video_frames,
                                      cfg.video_t_fail)
      print("video:", result["video"], flush=True)
  except ImportError as e:
    raise app.UsageError(str(e)) from e
  return result
