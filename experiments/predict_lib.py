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
from musica_jax import images as images_lib
from musica_jax import predictor as predictor_lib



# ---------------------------------------------------------------------------------------
# Inputs.


def load_image(path: str, flag: str = "--image") -> np.ndarray:
  """RGB uint8 [H, W, 3], upright by its EXIF orientation; a clear error naming the flag
  and the file when it cannot be read."""
  return load_photo(path, flag)[0]


def load_photo(path: str, flag: str = "--image") -> tuple[np.ndarray, int]:
  """(RGB uint8 [H, W, 3] upright, the EXIF orientation the file carried: 1 = none; see
  `images.read_image_and_orientation`). app.UsageError naming `flag` and the file when
  it cannot be read."""
  p = pathlib.Path(path)
  if not p.exists():
    raise app.UsageError(f"{flag}={path}: no such file")
  if not p.is_file():
    raise app.UsageError(f"{flag}={path}: not a file")
  try:
    return images_lib.read_image_and_orientation(p)
  except Exception as e:  # noqa: BLE001 - PIL raises many kinds for corrupt files
    raise app.UsageError(f"{flag}={path}: cannot read it as an image "
                         f"({type(e).__name__}: {e})") from e


def stored_orientation_and_size(path: str) -> tuple[int, tuple[int, int]]:
  """(EXIF orientation (1: none), stored (width, height)) from the file's header."""
  with Image.open(path) as im:
    try:
      orientation = int(im.getexif().get(images_lib.EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block: no orientation
      orientation = 1
    return (orientation if orientation in range(1, 9) else 1), im.size


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
    found = sorted(str(p) for p in d.iterdir() if p.suffix.lower() in readers.IMAGE_EXTENSIONS)
    if not found:
      kinds = "/".join(readers.IMAGE_EXTENSIONS)
      raise app.UsageError(f"--image_dir={image_dir}: no {kinds} files")
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
    try:   # a .pts is in stored pixels (the datasets' convention); the photo is read upright
      orientation, size = stored_orientation_and_size(path)
    except Exception:  # noqa: BLE001 - unreadable: load_inputs names it
      orientation, size = 1, None
    if orientation != 1:
      pts = images_lib.exif_transpose_points(pts, orientation, size)
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
                 title: str = "", min_side: int = 512, max_side: int = 4096) -> Image.Image:
  """The photo (enlarged so its shorter side is at least min_side, but its longer side
  not beyond max_side: a 1-pixel-wide photo is not blown up into a gigapixel image) with
  each face's box, landmarks and a label "err E  it I/S"."""
  h, w = image.shape[:2]
  k = min(max(1.0, min_side / min(h, w)), max(1.0, max_side / max(h, w)))
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


def load_inputs(paths, boxes, orientations: list | None = None) -> list[np.ndarray]:
  """The images (upright by their EXIF orientation, which is appended to `orientations`
  when given), with every box checked against its image (errors name file and flag)."""
  photos = [load_photo(p) for p in paths]
  images = [im for im, _ in photos]
  if orientations is not None:
    orientations.extend(o for _, o in photos)
  for path, image, b in zip(paths, images, boxes):
    for k in range(0 if b is None else len(b)):
      try:
        images_lib.check_box_in_image(b[k], image.shape, f"--box for {path}")
      except ValueError as e:
        raise app.UsageError(str(e)) from e
  return images


def check_outputs(output: str | None, output_json: str | None, video: bool = False) -> None:
  """Before the work: --output (a .png/.jpg file, or a folder; a video's is a folder) and
  --output_json can be written (`common.check_output`; one line naming the flag)."""
  if output_json:
    common.check_output(output_json, "output_json")
  if output:
    is_file = not video and pathlib.Path(output).suffix.lower() in (".png", ".jpg", ".jpeg")
    common.check_output(output, "output", "file" if is_file else "dir")


def write_overlays(items) -> list[str]:
  """items: (path, draw() -> PIL image, entry) per overlay; each drawn and saved, its
  path in entry["overlay"], or its failure in entry["overlay_error"] (the others go on).
  Returns the failures, one line each."""
  failures = []
  for out_png, draw, entry in items:
    try:
      out_png.parent.mkdir(parents=True, exist_ok=True)
      draw().save(out_png)
      entry["overlay"] = str(out_png)
    except Exception as e:  # noqa: BLE001 - PIL and the disk raise many kinds
      why = f"{type(e).__name__}: {common.one_line(e)}"
      entry["overlay_error"] = why
      failures.append(f"{out_png}: {why}")
  return failures


def overlay_failure(failures: list[str], output: str, output_json: str | None, total: int):
  """The one line for overlays that could not be written (after the JSON was)."""
  where = (f"; the predictions are in --output_json={output_json}" if output_json
           else "")
  return app.UsageError(f"--output={output}: {len(failures)} of {total} overlay(s) could "
                        f"not be written (first: {failures[0]}){where}")


def run(paths, boxes, pred_obj, ts=None, t_fail=None, output=None, output_json=None,
        images=None, budget=None, budget_mmacs=None, orientations=None) -> dict:
  """Predicts every face of every photo. Writes --output_json before the overlays, so an
  overlay that cannot be drawn or saved loses no prediction: it is recorded in its
  image's entry ("overlay_error") and the run ends with one line naming --output."""
  check_outputs(output, output_json)
  if images is None:
    orientations = []
    images = load_inputs(paths, boxes, orientations)
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
  overlays = []
  for i, (path, out_png) in enumerate(zip(paths, overlay_paths(paths, output))):
    mine = pred.for_image(i)
    entry = {"image": os.path.abspath(path), "height": int(images[i].shape[0]),
             "width": int(images[i].shape[1]),
             "faces": faces_json([f for f in faces if f["image_index"] == i])}
    if orientations:      # the EXIF orientation undone on reading (1: none)
      entry["exif_orientation"] = int(orientations[i])
    if out_png is not None:
      title = f"{pathlib.Path(path).name}  ({mine.landmarks.shape[1]} pts, max {stages} it)"
      overlays.append((out_png, lambda im=images[i], m=mine, t=title:
                       draw_overlay(im, m, stages, t), entry))
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
  failures = write_overlays(overlays)
  result["overlay_failures"] = len(failures)
  if output_json:
    common.write_json(output_json, result, indent=1)
  if failures:
    raise overlay_failure(failures, output, output_json, len(overlays))
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
  """(names, iterator of (frame RGB uint8 or None, why it is None)) of a folder of frames
  or a multi-frame image file. A frame that cannot be read comes as (None, reason); a
  multi-frame file that breaks at frame k > 0 ends there with that record. app.UsageError
  naming --video when there is nothing to read at all."""
  p = pathlib.Path(source)
  if p.is_dir():
    files = sorted(str(f) for f in p.iterdir() if f.suffix.lower() in readers.IMAGE_EXTENSIONS)
    if not files:
      kinds = "/".join(readers.IMAGE_EXTENSIONS)
      raise app.UsageError(f"--video={source}: no {kinds} frames in it")

    def read(f):
      try:
        return load_image(f, flag="--video"), ""
      except app.UsageError as e:
        return None, str(e)
    return [pathlib.Path(f).stem for f in files], (read(f) for f in files)
  if not p.is_file():
    raise app.UsageError(f"--video={source}: no such file or directory")
  from PIL import ImageSequence  # noqa: PLC0415
  frames, broken = [], ""
  try:
    with Image.open(p) as im:
      for frame in ImageSequence.Iterator(im):
        frames.append(np.asarray(frame.convert("RGB")))
  except Exception as e:  # noqa: BLE001 - PIL raises many kinds for unreadable files
    if not frames:
      raise app.UsageError(f"--video={source}: cannot read frames from it "
                           f"({type(e).__name__}: {e}; give a folder of frames or an "
                           f"animated GIF/TIFF)") from e
    broken = (f"--video={source}: frame {len(frames)} and any after it cannot be read "
              f"({type(e).__name__}: {' '.join(str(e).split())})")
  items = [(f, "") for f in frames] + ([(None, broken)] if broken else [])
  return [f"frame_{i:05d}" for i in range(len(items))], iter(items)


def run_video(source, pred_obj, ts=None, t_fail=None, output=None, output_json=None,
              budget=None, budget_mmacs=None) -> dict:
  """Tracks the faces through the frames of `source` (see experiments/predict.py). A
  frame that cannot be read (or predicted: a ValueError of the predictor) is skipped:
  its record in the JSON says why ("skipped": true, "error"), the count is printed and in
  the JSON ("skipped_frames"), and the run goes on with the next frame. An overlay that
  cannot be drawn or saved is recorded in its frame's entry ("overlay_error"); the run
  goes on, writes the JSON and then ends with one line naming --output."""
  from musica_jax import tracking  # noqa: PLC0415
  check_outputs(output, output_json, video=True)
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
  skipped, failures, overlays = [], [], 0
  for name, (frame, why) in zip(names, frames):
    if frame is not None:
      try:
        step = tracker.step(frame)
      except ImportError as e:
        raise app.UsageError(f"--video: the first frame needs the face detector: {e}") from e
      except ValueError as e:       # a frame the predictor refuses (size, values)
        frame, why = None, f"--video={source}: frame {name}: {common.one_line(e)}"
    if frame is None:
      print(f"warning: skipped: {why}", flush=True)
      skipped.append(name)
      result["frames"].append({"frame": name, "skipped": True, "error": why, "faces": []})
      continue
    pred = step.prediction
    entry = {"frame": name, "redetected": step.redetected, "reason": step.reason,
             "faces": faces_json(pred.to_json())}
    if out_dir is not None:         # now: a video's frames are not all kept in memory
      title = f"{name}  re-detections {tracker.redetections}"
      overlays += 1
      failures += write_overlays([(out_dir / f"{name}.overlay.png",
                                   lambda: draw_overlay(frame, pred, stages, title), entry)])
    result["frames"].append(entry)
  result["redetections"] = tracker.redetections
  result["skipped_frames"] = len(skipped)
  result["seconds_including_compile"] = time.perf_counter() - t0
  its = [g["iterations"] for f in result["frames"] for g in f["faces"]]
  result["mean_iterations"] = float(np.mean(its)) if its else None
  faces = sum(len(f["faces"]) for f in result["frames"])
  print(f"{source}: {len(result['frames'])} frames, {faces} faces, "
        f"{tracker.redetections} detector runs"
        + (f", mean iterations {result['mean_iterations']:.2f}" if its else "")
        + (f" (budget {budget_it:g})" if budget_it is not None else "")
        + (f" -> {out_dir}/" if out_dir else ""))
  if skipped:
    print(f"--video={source}: skipped {len(skipped)} of {len(result['frames'])} frame(s) "
          f"that could not be read or predicted ({', '.join(skipped[:5])}"
          f"{', ...' if len(skipped) > 5 else ''}; each has a record in the JSON)")
  result["overlay_failures"] = len(failures)
  if output_json:
    common.write_json(output_json, result, indent=1)
  if failures:
    raise overlay_failure(failures, output, output_json, overlays)
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
