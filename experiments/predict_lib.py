"""The work of experiments.predict, flag-free: inputs (images, boxes), the predictor, the
overlay, a photo run (`run`) and a video run (`run_video`). Errors are app.UsageError
naming the flag or file (one line under common.run); tests call these in-process."""
from __future__ import annotations

import os
import pathlib
import time

from absl import app
import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from data_pipelines import readers
from experiments import common
from musica_jax import predictor as predictor_lib

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


# ---------------------------------------------------------------------------------------
# Inputs.


def load_image(path: str) -> np.ndarray:
  """RGB uint8 [H, W, 3]; a clear error naming the file when it cannot be read."""
  p = pathlib.Path(path)
  if not p.exists():
    raise app.UsageError(f"--image={path}: no such file")
  if not p.is_file():
    raise app.UsageError(f"--image={path}: not a file")
  try:
    return predictor_lib.read_image(p)
  except Exception as e:  # noqa: BLE001 - PIL raises many kinds for corrupt files
    raise app.UsageError(f"--image={path}: cannot read it as an image "
                         f"({type(e).__name__}: {e})") from e


def parse_boxes(text: str, flag: str = "--box") -> np.ndarray:
  """'x0,y0,x1,y1[;x0,y0,x1,y1...]' -> [K, 4]."""
  boxes = []
  for part in text.split(";"):
    part = part.strip()
    if not part:
      continue
    try:
      vals = [float(v) for v in part.split(",")]
    except ValueError as e:
      raise app.UsageError(f"{flag}={text}: numbers x0,y0,x1,y1 expected ({e})") from e
    if len(vals) != 4:
      raise app.UsageError(f"{flag}={text}: 4 numbers x0,y0,x1,y1 per box, got {len(vals)}")
    boxes.append(vals)
  if not boxes:
    raise app.UsageError(f"{flag}: empty")
  return np.asarray(boxes, np.float64)


def image_paths(images: list[str], image_dir: str | None) -> list[str]:
  paths = [p.strip() for arg in images for p in arg.split(",") if p.strip()]
  if image_dir:
    d = pathlib.Path(image_dir)
    if not d.is_dir():
      raise app.UsageError(f"--image_dir={image_dir}: not a directory")
    found = sorted(str(p) for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not found:
      raise app.UsageError(f"--image_dir={image_dir}: no {'/'.join(IMAGE_EXTENSIONS)} files")
    paths += found
  if not paths:
    raise app.UsageError("give --image=PATH (repeatable, or a comma list) or --image_dir=DIR")
  return paths


def boxes_for(paths: list[str], box_flags: list[str], from_pts: bool) -> list[np.ndarray]:
  """Per image [K, 4] boxes from --box / --box_from_pts."""
  given = [parse_boxes(b) for b in box_flags]
  if len(given) not in (0, 1, len(paths)):
    raise app.UsageError(f"--box given {len(given)} times for {len(paths)} images: give it "
                         f"once (same box for all) or once per image")
  out = []
  for i, path in enumerate(paths):
    if given:
      out.append(given[0] if len(given) == 1 else given[i])
      continue
    if not from_pts:
      out.append(None)            # detect the faces
      continue
    pts_path = os.path.splitext(path)[0] + ".pts"
    if not os.path.exists(pts_path):
      raise app.UsageError(f"--box_from_pts: {pts_path} not found (no --box for {path})")
    try:
      pts = readers.read_pts(pts_path)
    except ValueError as e:
      raise app.UsageError(f"--box_from_pts: {e}") from e
    out.append(np.concatenate([pts.min(0), pts.max(0)])[None])
  return out


def load_predictor(workdir, model, checkpoint="latest", max_batch=64):
  if max_batch < 1 or max_batch & (max_batch - 1):
    raise app.UsageError(f"--max_batch={max_batch}: must be a power of two")
  loaded = common.load_model(workdir, model, checkpoint, default_if_none=True)
  return predictor_lib.Predictor.from_loaded(loaded, max_batch=max_batch)


# ---------------------------------------------------------------------------------------
# Overlay.


def _font(size):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1
    return ImageFont.load_default()


def draw_overlay(image: np.ndarray, pred: predictor_lib.Prediction, num_iterations: int,
                 title: str = "", min_side: int = 512) -> Image.Image:
  """The photo (enlarged so its shorter side is at least min_side) with each face's box,
  landmarks and a label "err E  it I/S"."""
  h, w = image.shape[:2]
  k = max(1.0, min_side / min(h, w))
  im = Image.fromarray(image).resize((round(w * k), round(h * k)), Image.BILINEAR) \
      if k > 1 else Image.fromarray(image)
  draw = ImageDraw.Draw(im)
  font = _font(max(12, round(im.height / 40)))
  to_px = lambda p: ((p[..., 0] + 0.5) * k - 0.5, (p[..., 1] + 0.5) * k - 0.5)
  r = max(1.5, im.height / 260)
  for f in range(len(pred)):
    colour = (40, 230, 40) if pred.valid[f] else (240, 40, 40)
    x0, y0 = to_px(pred.boxes[f, :2])
    x1, y1 = to_px(pred.boxes[f, 2:])
    draw.rectangle([x0, y0, x1, y1], outline=(255, 220, 0), width=max(1, round(r / 1.5)))
    xs, ys = to_px(pred.landmarks[f])
    for x, y in zip(xs, ys):
      draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline=(0, 0, 0))
    label = (f"err {pred.estimated_error[f]:.3f}  it {int(pred.iterations[f])}/{num_iterations}"
             + ("" if pred.valid[f] else "  INVALID"))
    ty = y0 - font.size - 6 if y0 - font.size - 6 > 0 else y1 + 4
    box = draw.textbbox((x0, ty), label, font=font)
    draw.rectangle([box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3], fill=(0, 0, 0))
    draw.text((x0, ty), label, fill=colour, font=font)
  if title:
    box = draw.textbbox((4, 4), title, font=font)
    draw.rectangle([0, 0, box[2] + 4, box[3] + 4], fill=(0, 0, 0))
    draw.text((4, 4), title, fill=(255, 255, 255), font=font)
  return im


def save_overlay(path: pathlib.Path, image, pred, num_iterations: int, title: str) -> None:
  """draw_overlay(...) saved to `path` (its folder made)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  draw_overlay(image, pred, num_iterations, title).save(path)


def faces_json(faces: list[dict]) -> list[dict]:
  """Prediction.to_json() faces without their image index (the entry says the image)."""
  return [{k: v for k, v in f.items() if k != "image_index"} for f in faces]


def overlay_paths(paths: list[str], output: str | None) -> list[pathlib.Path | None]:
  if not output:
    return [None] * len(paths)
  out = pathlib.Path(output)
  if out.suffix.lower() in (".png", ".jpg", ".jpeg"):
    if len(paths) > 1:
      raise app.UsageError(f"--output={output} is one file but there are {len(paths)} "
                           f"images: give a directory")
    return [out]
  names = [pathlib.Path(p).stem for p in paths]
  dupes = {n for n in names if names.count(n) > 1}
  return [out / (f"{n}_{i}.overlay.png" if n in dupes else f"{n}.overlay.png")
          for i, n in enumerate(names)]


# ---------------------------------------------------------------------------------------


def load_inputs(paths, boxes) -> list[np.ndarray]:
  """The images, with every box checked against its image (errors name file and flag)."""
  images = [load_image(p) for p in paths]
  for path, image, b in zip(paths, images, boxes):
    for k in range(0 if b is None else len(b)):
      try:
        predictor_lib.check_box_in_image(b[k], image.shape, f"--box for {path}")
      except ValueError as e:
        raise app.UsageError(str(e)) from e
  return images


def run(paths, boxes, pred_obj, ts=None, t_fail=None, output=None, output_json=None,
        images=None, budget=None, budget_mmacs=None) -> dict:
  if images is None:
    images = load_inputs(paths, boxes)
  ts_v = -np.inf if ts is None else ts
  t_fail_v = t_fail            # None: the model's default Tf
  t0 = time.perf_counter()
  boxes = [find_faces(pred_obj, im, path) if b is None else b
           for path, im, b in zip(paths, images, boxes)]
  try:
    pred = pred_obj.predict(images, boxes, ts=ts_v, t_fail=t_fail_v, budget=budget,
                            budget_mmacs=budget_mmacs)
  except ValueError as e:
    if "budget" in str(e):
      raise app.UsageError(f"--budget: {e}") from e
    raise app.UsageError(str(e)) from e     # a bad image or box: one line
  seconds = time.perf_counter() - t0
  stages = pred_obj.model_config.num_stages
  faces = pred.to_json()
  result = {"model": pred_obj.metadata, "ts": ts,
            "t_fail": pred_obj.default_t_fail if t_fail is None else t_fail, "budget": budget,
            "budget_mmacs": budget_mmacs, "num_iterations": stages,
            "seconds_including_compile": seconds, "images": []}
  for i, (path, out_png) in enumerate(zip(paths, overlay_paths(paths, output))):
    mine = pred.for_image(i)
    entry = {"image": os.path.abspath(path), "height": int(images[i].shape[0]),
             "width": int(images[i].shape[1]),
             "faces": faces_json([f for f in faces if f["image_index"] == i])}
    if out_png is not None:
      title = f"{pathlib.Path(path).name}  ({mine.landmarks.shape[1]} pts, max {stages} it)"
      save_overlay(out_png, images[i], mine, stages, title)
      entry["overlay"] = str(out_png)
    result["images"].append(entry)
    for f in entry["faces"]:
      print(f"{path}: box {[round(v, 1) for v in f['box']]} estimated error "
            f"{f['estimated_error']:.4f} iterations {f['iterations']}/{stages} "
            f"valid {f['valid']}" + (f" -> {out_png}" if out_png else ""))
  its = [f["iterations"] for f in faces]
  result["mean_iterations"] = float(np.mean(its)) if its else None
  if its and (budget is not None or budget_mmacs is not None):
    print(f"mean iterations {result['mean_iterations']:.2f} over {len(its)} "
          f"face{'s' if len(its) > 1 else ''} (budget "
          f"{pred_obj.budget_iterations(budget, budget_mmacs):g} per face on average)")
  if output_json:
    common.write_json(output_json, result, indent=1)
  return result


def find_faces(pred_obj, image, path) -> np.ndarray:
  """The detector's faces (model's box convention); a clear error without dlib."""
  try:
    boxes = pred_obj.find_faces(image)
  except ImportError as e:
    raise app.UsageError(f"no --box for {path} and no detector: {e} (or give --box / "
                         f"--box_from_pts)") from e
  except ValueError as e:
    raise app.UsageError(f"no --box for {path}: {e}") from e
  if not len(boxes):
    print(f"{path}: no face found")
  return boxes


# ---------------------------------------------------------------------------------------
# Video.


def video_frames(source: str):
  """(names, frame iterator) of a folder of frames or a multi-frame image file."""
  p = pathlib.Path(source)
  if p.is_dir():
    files = sorted(str(f) for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
      raise app.UsageError(f"--video={source}: no {'/'.join(IMAGE_EXTENSIONS)} frames in it")
    return [pathlib.Path(f).stem for f in files], (load_image(f) for f in files)
  if not p.is_file():
    raise app.UsageError(f"--video={source}: no such file or directory")
  from PIL import ImageSequence  # noqa: PLC0415
  try:
    with Image.open(p) as im:
      frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
  except Exception as e:  # noqa: BLE001 - PIL raises many kinds for unreadable files
    raise app.UsageError(f"--video={source}: cannot read frames from it ({type(e).__name__}: "
                         f"{e}; give a folder of frames or an animated GIF/TIFF)") from e
  return [f"frame_{i:05d}" for i in range(len(frames))], iter(frames)


def run_video(source, pred_obj, ts=None, t_fail=None, output=None, output_json=None,
              budget=None, budget_mmacs=None) -> dict:
  from musica_jax import tracking  # noqa: PLC0415
  names, frames = video_frames(source)
  t_fail_v = 0.08 if t_fail is None else t_fail
  try:
    budget_it = pred_obj.budget_iterations(budget, budget_mmacs)
  except ValueError as e:
    raise app.UsageError(f"--budget: {e}") from e
  tracker = tracking.FaceTracker(pred_obj, t_fail=t_fail_v, ts=-np.inf if ts is None else ts,
                                 budget=budget_it)
  stages = pred_obj.model_config.num_stages
  out_dir = pathlib.Path(output) if output else None
  result = {"model": pred_obj.metadata, "video": os.path.abspath(source), "t_fail": t_fail_v,
            "ts": ts, "budget": budget_it, "num_iterations": stages, "frames": []}
  t0 = time.perf_counter()
  for name, frame in zip(names, frames):
    try:
      step = tracker.step(frame)
    except ImportError as e:
      raise app.UsageError(f"--video: the first frame needs the face detector: {e}") from e
    pred = step.prediction
    entry = {"frame": name, "redetected": step.redetected, "reason": step.reason,
             "faces": faces_json(pred.to_json())}
    if out_dir is not None:
      save_overlay(out_dir / f"{name}.overlay.png", frame, pred, stages,
                   f"{name}  re-detections {tracker.redetections}")
    result["frames"].append(entry)
  result["redetections"] = tracker.redetections
  result["seconds_including_compile"] = time.perf_counter() - t0
  its = [g["iterations"] for f in result["frames"] for g in f["faces"]]
  result["mean_iterations"] = float(np.mean(its)) if its else None
  faces = sum(len(f["faces"]) for f in result["frames"])
  print(f"{source}: {len(result['frames'])} frames, {faces} faces, "
        f"{tracker.redetections} detector runs"
        + (f", mean iterations {result['mean_iterations']:.2f}" if its else "")
        + (f" (budget {budget_it:g})" if budget_it is not None else "")
        + (f" -> {out_dir}/" if out_dir else ""))
  if output_json:
    common.write_json(output_json, result, indent=1)
  return result


def enable_compilation_cache(path: str) -> None:
  """A persistent XLA cache: the next process loads the compiled cascade instead of
  compiling it (the first pass of a CLI run then costs about the warm pass)."""
  if not path:
    return
  import jax  # noqa: PLC0415
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
