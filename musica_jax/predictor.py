"""Landmarks for faces in photos: image + face box(es) -> landmarks, estimated error,
iterations used, valid flag. numpy + PIL + JAX only (no TensorFlow).

    from musica_jax.predictor import Predictor
    p = Predictor.from_saved_model("model_dir")      # or .from_workdir(W) / .default()
    pred = p.predict(image, [x0, y0, x1, y1])        # image: HxWx3 uint8 (RGB)
    pred.landmarks[0]                                # [N, 2] image pixels (0-based, centres)

The face crop is the evaluation pipeline's (data_pipelines.input_pipeline
make_eval_dataset) and has one definition, `musica_jax.crop`: the host copies the photo
rectangle each face needs (nothing compiled per photo size); the blend, zero fill and
standardisation run in the same jitted program as the cascade, compiled once per
power-of-two face-batch bucket, crop source side and dial setting.
Without boxes, `predict` finds the faces with a detector (`musica_jax.detector`).

Decoding: `read_image` decodes with PIL (exact IDCT for JPEG) and turns a photo upright by
its EXIF orientation tag (a phone photo stored sideways); `exif_transpose=False` gives
the stored pixels, as TensorFlow's decoders do (the dataset tools read dataset images so,
their .pts being in stored pixels). TensorFlow's default JPEG IDCT (INTEGER_FAST) differs
from PIL by a few grey levels; the training/eval pipeline matches PIL exactly when it
decodes with dct_method="INTEGER_ACCURATE".
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from musica_jax import crop as crop_lib
from musica_jax import face_frame
from musica_jax import fast_inference
from musica_jax import host_memory
from musica_jax import model_io
from musica_jax import quit_head as quit_head_lib
from musica_jax.config import ModelConfig



# ---------------------------------------------------------------------------------------
# Buckets.


def count_bucket(n: int, maximum: int) -> int:
  """Smallest power of two >= n (capped at maximum)."""
  return min(1 << max(int(n) - 1, 0).bit_length(), maximum)


# ---------------------------------------------------------------------------------------
# Input checks.


def read_image(path, exif_transpose: bool = True) -> np.ndarray:
  """A photo file (a path or a binary file object) as RGB uint8 [H, W, 3] (PIL;
  greyscale/RGBA converted to RGB; 16-bit greyscale scaled to 8 bits, see
  `_high_bit_depth_to_rgb8`), turned upright by its EXIF orientation tag (a phone photo
  stored sideways with Orientation=6 comes back as the camera saw it; see
  `read_image_and_orientation`). exif_transpose=False: the stored pixels, as TensorFlow's
  decoders give them (dataset images, whose .pts landmarks are in stored pixels)."""
  return read_image_and_orientation(path, exif_transpose)[0]


EXIF_ORIENTATION = 0x0112     # the EXIF tag (274); 1 = upright, 2..8 = flips / rotations


def read_image_and_orientation(path, exif_transpose: bool = True) -> tuple[np.ndarray, int]:
  """(RGB uint8 [H, W, 3] as `read_image`, the EXIF orientation of the file: 1 when it
  has none; 2..8 when the stored pixels are flipped or rotated, undone with PIL's
  ImageOps.exif_transpose unless exif_transpose=False)."""
  from PIL import Image  # noqa: PLC0415
  from PIL import ImageOps  # noqa: PLC0415
  with Image.open(path) as im:
    im.load()
    try:
      orientation = int(im.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block: no orientation
      orientation = 1
    if orientation not in range(1, 9):
      orientation = 1                 # out-of-range tags are ignored, as exif_transpose does
    fmt = im.format                   # the transposed copy has none
    if exif_transpose and orientation != 1:
      im = ImageOps.exif_transpose(im)
    if im.mode in HIGH_BIT_DEPTH_MODES:
      return _high_bit_depth_to_rgb8(im, path, fmt), orientation
    return np.asarray(im.convert("RGB")), orientation


def exif_transpose_points(points, orientation: int, stored_size) -> np.ndarray:
  """Points [..., 2] (x, y pixel centres) of the stored pixels of a photo whose EXIF
  orientation is `orientation` and stored size (width, height) -> the same points on the
  upright photo `read_image` returns (e.g. a .pts file's landmarks, which datasets give in
  stored pixels)."""
  p = np.asarray(points, np.float64)
  x, y = p[..., 0], p[..., 1]
  w, h = float(stored_size[0]) - 1.0, float(stored_size[1]) - 1.0
  mapped = {1: (x, y), 2: (w - x, y), 3: (w - x, h - y), 4: (x, h - y), 5: (y, x),
            6: (h - y, x), 7: (h - y, w - x), 8: (y, w - x)}[int(orientation)]
  return np.stack(mapped, -1)


# PIL modes whose convert("RGB") clips every value above 255 to white.
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _high_bit_depth_to_rgb8(im, path, fmt=None) -> np.ndarray:
  """16-bit greyscale (PIL modes I;16*, and I for a 16-bit PNG) -> RGB uint8 by value /
  257 (65535 -> 255); 32-bit integer or float images are refused: their range is unknown."""
  fmt = fmt or im.format
  sixteen = im.mode.startswith("I;16") or (im.mode == "I" and fmt == "PNG")
  if not sixteen:
    raise ValueError(f"{path}: {im.mode} image ({fmt}) with an unknown value range; "
                     f"convert it to 8-bit RGB first")
  grey = np.asarray(im, np.float64)
  if grey.min() < 0 or grey.max() > 65535:
    raise ValueError(f"{path}: 16-bit image with values outside 0..65535")
  grey = np.round(grey / 257.0).astype(np.uint8)
  return np.repeat(grey[..., None], 3, axis=-1)


def check_image(image, where: str = "image") -> np.ndarray:
  """An HxWx3 RGB photo with values in 0..255 (uint8 preferred) -> the array.

  Float photos are taken in 0..255, as uint8 ones. A float photo whose values lie in
  0..1 (max <= 1, not all zero: the other common convention) is refused with a hint to
  multiply it by 255: the crop would pass it (it standardises each face) but the face
  detector would see a black photo and find no face, so the two would disagree. Both the
  predictor (`predict`, `find_faces`) and the detector (`detector.DlibHogDetector`) check
  their photo here."""
  if not isinstance(image, np.ndarray):
    try:
      image = np.asarray(image)
    except Exception as e:  # noqa: BLE001 - anything that is not array-like
      raise TypeError(f"{where}: expected an HxWx3 array, got {type(image).__name__}") from e
  if image.ndim != 3 or image.shape[-1] != 3:
    hint = (" (greyscale: stack it to 3 channels; RGBA: drop alpha; PIL: "
            "np.asarray(Image.open(p).convert('RGB')))")
    raise ValueError(f"{where}: expected an HxWx3 RGB array, got shape {image.shape}{hint}")
  if image.shape[0] < 1 or image.shape[1] < 1:
    raise ValueError(f"{where}: empty image of shape {image.shape}")
  if image.dtype == np.uint8:
    return image
  if image.dtype.kind not in "uif":
    raise TypeError(f"{where}: expected a numeric (uint8) array, got dtype {image.dtype}")
  if image.dtype.kind == "f" and not np.all(np.isfinite(image)):
    raise ValueError(f"{where}: image has non-finite values")
  lo, hi = float(image.min()), float(image.max())
  if lo < 0 or hi > 255:
    raise ValueError(f"{where}: values must be in 0..255 (uint8 RGB), got {lo}..{hi}")
  if image.dtype.kind == "f" and 0 < hi <= 1.0:
    raise ValueError(f"{where}: a float image with values in 0..1 (max {hi:g}); photos are "
                     f"taken in 0..255: multiply it by 255 (or pass uint8)")
  return image


def check_box_in_image(box, image_shape, where: str = "box") -> np.ndarray:
  """A finite non-empty box whose centre lies inside the photo (the crop is centred on it;
  a box may stick out of the photo, as detector boxes at the border do)."""
  box = face_frame.validate_box(box, where)
  h, w = image_shape[:2]
  cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
  if not (-0.5 <= cx <= w - 0.5 and -0.5 <= cy <= h - 0.5):
    raise ValueError(f"{where}: box {box.tolist()} is outside the {w}x{h} image (its centre "
                     f"({cx:.1f}, {cy:.1f}) is not in the image; boxes are x0,y0,x1,y1 in "
                     f"pixels)")
  check_face_box_size(box, image_shape, where)
  return box


# The smallest face box (sqrt(width x height), photo pixels) the model is asked about: the
# crop is 228 px, so a smaller face is blown up more than 10x and its landmarks are noise.
MIN_FACE_SIZE = 20.0
# The least fraction of a box's area that must lie inside the photo (a face at a corner, its
# box centred inside the photo, has about a quarter inside; detector boxes stick
# out a little at the border; a box mostly outside holds no face).
MIN_BOX_INSIDE = 0.25


def check_face_box_size(box, image_shape, where: str = "box") -> None:
  """Refuses face boxes below MIN_FACE_SIZE pixels, and boxes with less than
  MIN_BOX_INSIDE of their area inside the photo (a huge box, a tiny photo)."""
  h, w = image_shape[:2]
  bw, bh = float(box[2] - box[0]), float(box[3] - box[1])
  size = float(np.sqrt(bw * bh))
  if size < MIN_FACE_SIZE:
    raise ValueError(f"{where}: box {np.round(box, 1).tolist()} is a {size:.1f}-pixel face; "
                     f"the model needs at least {MIN_FACE_SIZE:g} pixels (image {w}x{h})")
  iw = max(0.0, min(float(box[2]), w) - max(float(box[0]), 0.0))
  ih = max(0.0, min(float(box[3]), h) - max(float(box[1]), 0.0))
  inside = iw * ih / (bw * bh)
  if inside < MIN_BOX_INSIDE:
    raise ValueError(f"{where}: box {np.round(box, 1).tolist()} lies {100 * (1 - inside):.0f}% "
                     f"outside the {w}x{h} image (at most {100 * (1 - MIN_BOX_INSIDE):.0f}% "
                     f"allowed)")


def _photo_list(images) -> tuple[list, bool]:
  """-> (the photos as a list, was the input a single photo?). An empty list is refused."""
  if isinstance(images, np.ndarray) and images.ndim == 4:
    images = list(images)          # a batch of same-size photos
  if isinstance(images, (list, tuple)):
    if not len(images):
      raise ValueError("images: an empty list; give one HxWx3 photo or a list of them")
    return list(images), False
  return [images], True


def _is_flat_box(boxes) -> bool:
  """True for one box given as 4 numbers (x0, y0, x1, y1) where a list per image is due."""
  try:
    arr = np.asarray(boxes, np.float64)
  except (TypeError, ValueError):
    return False                   # ragged: per-image entries
  return arr.ndim == 1 and arr.size == 4


def _normalise_inputs(images, boxes):
  """-> (list of photos, list of [K_i, 4] box arrays)."""
  images, single = _photo_list(images)
  if single:
    boxes = [boxes]
  elif _is_flat_box(boxes):
    n = len(images)
    raise ValueError(f"boxes: one box {np.asarray(boxes, np.float64).tolist()} for a list of "
                     f"{n} image{'s' if n > 1 else ''}: give one entry per image (a box, "
                     f"or a list of boxes), e.g. [box] * {n} for the same box in each")
  if not single and isinstance(boxes, np.ndarray) and boxes.ndim >= 2:
    boxes = list(boxes)            # [n, 4] (one box per image) or [n, K, 4]
  if not single and (not isinstance(boxes, (list, tuple)) or len(boxes) != len(images)):
    n = len(boxes) if isinstance(boxes, (list, tuple)) else "not a list"
    raise ValueError(f"boxes: one entry (a box or a list of boxes) per image expected: "
                     f"{len(images)} images, boxes: {n}")
  photos = [check_image(im, f"image {i}") for i, im in enumerate(images)]
  out = []
  for i, (photo, b) in enumerate(zip(photos, boxes)):
    arr = np.asarray(b, np.float64)
    if arr.size == 0:
      arr = arr.reshape(0, 4)      # no face in this image (e.g. none detected)
    if arr.ndim == 1:
      arr = arr[None]
    if arr.ndim != 2 or arr.shape[-1] != 4:
      raise ValueError(f"boxes of image {i}: expected (x0, y0, x1, y1) or a list of them, "
                       f"got shape {np.shape(b)}")
    for k in range(arr.shape[0]):
      check_box_in_image(arr[k], photo.shape, f"box {k} of image {i}")
    out.append(arr)
  return photos, out


def _frames(images, boxes):
  """-> (photos, image_index [F], boxes [F, 4], scale [F], offset [F, 2]) of every box of
  every image (checked)."""
  photos, box_lists = _normalise_inputs(images, boxes)
  image_index = np.concatenate([np.full(len(b), i, np.int32) for i, b in enumerate(box_lists)])
  all_boxes = np.concatenate(box_lists, 0)
  scale, offset = face_frame.crop_frames(all_boxes)
  return photos, image_index, all_boxes, scale, offset


def face_sources(images, boxes, size: int = face_frame.CROP_SIZE):
  """The host part of the crops (`crop.prepare`) of every box of every image.

  images/boxes as `Predictor.predict`. Returns (crop.CropSources, scale [F],
  offset [F, 2], image_index [F], boxes [F, 4]).
  """
  photos, image_index, all_boxes, scale, offset = _frames(images, boxes)
  sources = crop_lib.prepare(photos, image_index, scale, offset, size)
  return sources, scale, offset, image_index, all_boxes


def face_crops(images, boxes, size: int = face_frame.CROP_SIZE):
  """Standardised face crops as the evaluation pipeline makes them (`musica_jax.crop`).

  images/boxes as `Predictor.predict`. Returns (crops float32 [F, size, size, 3] (a jax
  array), scale [F], offset [F, 2], image_index [F], boxes [F, 4]).
  """
  sources, scale, offset, image_index, all_boxes = face_sources(images, boxes, size)
  return crop_lib.crops(sources), scale, offset, image_index, all_boxes


# ---------------------------------------------------------------------------------------
# Results.


@dataclasses.dataclass
class Prediction:
  """Per face (faces of all images, in input order; F of them)."""
  landmarks: np.ndarray        # float32 [F, N, 2] image pixels (0-based, pixel centres)
  estimated_error: np.ndarray  # float32 [F] the model's estimate of its inter-ocular NME
  iterations: np.ndarray       # int32 [F] iterations used (early exit with ts)
  valid: np.ndarray            # bool [F] estimated_error < t_fail
  image_index: np.ndarray      # int32 [F] which input image
  boxes: np.ndarray            # float64 [F, 4] the input boxes
  crop_landmarks: np.ndarray   # float32 [F, N, 2] in the 228-px crop frame

  def __len__(self):
    return int(self.image_index.shape[0])

  def for_image(self, i: int) -> "Prediction":
    sel = self.image_index == i
    return Prediction(**{f.name: getattr(self, f.name)[sel] for f in dataclasses.fields(self)})

  def to_json(self) -> list[dict]:
    return [{"image_index": int(self.image_index[f]), "box": self.boxes[f].tolist(),
             "landmarks": np.round(self.landmarks[f].astype(np.float64), 3).tolist(),
             "estimated_error": float(self.estimated_error[f]),
             "iterations": int(self.iterations[f]), "valid": bool(self.valid[f])}
            for f in range(len(self))]


# ---------------------------------------------------------------------------------------
# The predictor.


class Predictor:
  """A trained cascade + the evaluation crop, for photos and face boxes.

  Args:
    params: stacked stage parameters (e.g. EMA parameters).
    model_config: the ModelConfig they belong to.
    mean_shape: [N, 2] initial shape in crop pixels (training-set mean).
    max_batch: largest number of faces run through the cascade at once; batches are
      padded to powers of two up to it.
    min_batch: smallest padded batch (fewer compiled programs, more padding).
    metadata: free-form description kept on the object (`.metadata`).
    quit_params / quit_info: the model's quitting policy (`musica_jax.quit_head`): a
      learned head (or None: the network's estimated error) and its validation profile,
      which turns a budget into per-stage capacities (needed for `budget=`).
    face_finder: image -> face boxes [K, 4] in the landmark-box convention, for
      `predict` without boxes; default (built on first use): dlib's HOG detector with the
      shipped box fit (`musica_jax.detector.FaceFinder`; needs the peers extra).
  """

  def __init__(self, params: Any, model_config: ModelConfig, mean_shape, *,
               max_batch: int = 64, min_batch: int = 1, metadata: dict | None = None,
               quit_params=None, quit_info: dict | None = None, face_finder=None,
               default_t_fail: float | None = None):
    if not isinstance(model_config, ModelConfig):
      raise TypeError(f"model_config must be a ModelConfig, got {type(model_config).__name__}")
    mean_shape = np.asarray(mean_shape, np.float32)
    if mean_shape.shape != (model_config.num_landmarks, 2):
      raise ValueError(f"mean_shape must be [{model_config.num_landmarks}, 2], got "
                       f"{mean_shape.shape}")
    if max_batch < 1 or max_batch & (max_batch - 1):
      raise ValueError(f"max_batch must be a power of two, got {max_batch}")
    if not 1 <= min_batch <= max_batch:
      raise ValueError(f"min_batch must be in [1, max_batch], got {min_batch}")
    host_memory.keep_large_buffers()
    self.model_config = model_config
    self.mean_shape = mean_shape
    self.max_batch = max_batch
    self.min_batch = min_batch
    self.metadata = dict(metadata or {})
    self.params = jax.device_put(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params))
    self._init = jnp.asarray(mean_shape)
    self.quit_info = quit_info
    # The failure threshold `predict` uses when given none (model.json's default_t_fail,
    # chosen on a validation split; inf: every face valid).
    self.default_t_fail = np.inf if default_t_fail is None else float(default_t_fail)
    self.fast = fast_inference.FastCascade(self.params, model_config, quit_params=quit_params)
    self._face_finder = face_finder
    self._budget_streams: dict[float, quit_head_lib.BudgetStream] = {}

  def find_faces(self, image) -> np.ndarray:
    """Face boxes [K, 4] (landmark-box convention) of one photo, by the face finder."""
    if self._face_finder is None:
      from musica_jax import detector  # noqa: PLC0415  (dlib is optional)
      self._face_finder = detector.FaceFinder(self.model_config.num_landmarks)
    return np.asarray(self._face_finder(check_image(image)), np.float64).reshape(-1, 4)

  @classmethod
  def from_loaded(cls, m: model_io.LoadedModel, **kwargs) -> "Predictor":
    """A model loaded by `model_io.load` / `restore` / `load_model`."""
    meta = dict(m.metadata)
    if not m.from_workdir:
      meta.update(model_path=str(m.path), param_dtype=m.dtype)
    kwargs.setdefault("default_t_fail", m.default_t_fail)
    return cls(m.params, m.model_config, m.mean_shape, metadata=meta,
               quit_params=m.quit_head, quit_info=m.quit_info, **kwargs)

  @classmethod
  def from_workdir(cls, workdir, step="latest", **kwargs) -> "Predictor":
    """EMA weights of a training run's checkpoint ("latest", "best" or a step number)."""
    return cls.from_loaded(model_io.restore(workdir, step), **kwargs)

  @classmethod
  def from_saved_model(cls, path, **kwargs) -> "Predictor":
    """A directory written by model_io.save_model / experiments.export_model."""
    return cls.from_loaded(model_io.load_model(path), **kwargs)

  @classmethod
  def default(cls, **kwargs) -> "Predictor":
    """The package's shipped model (musica_jax/default_model/)."""
    return cls.from_loaded(model_io.load("default"), **kwargs)

  def crops(self, images, boxes):
    """Standardised crops exactly as the evaluation pipeline makes them (see face_crops)."""
    return face_crops(images, boxes, self.model_config.image_size)

  # -- the cascade --------------------------------------------------------------------

  def budget_iterations(self, budget=None, budget_mmacs=None) -> float | None:
    """A budget in mean iterations per face (from either form), checked; None if none."""
    return quit_head_lib.budget_iterations(self.model_config, self.quit_info, budget,
                                           budget_mmacs)

  def budget_stream(self, budget: float) -> "quit_head_lib.BudgetStream":
    """The running account of a budget over this predictor's calls (faces seen,
    iterations run: `.mean_iterations`); see `run_fast`."""
    budget = float(budget)
    if budget not in self._budget_streams:
      self._budget_streams[budget] = quit_head_lib.BudgetStream(
          self.quit_info, budget, self.model_config.num_stages)
    return self._budget_streams[budget]

  def reset_budget_streams(self) -> None:
    """Forgets every budget's running account (a new video, a new folder)."""
    self._budget_streams.clear()

  def run_fast(self, crops, ts=-np.inf, t_fail=np.inf, budget: float | None = None):
    """The early-exit cascade on standardised crops [F, 228, 228, 3] that skips the
    iterations of faces that quit (`fast_inference.run_selective`; numpy out).

    ts: threshold on the quitting score. budget: mean iterations per face (1..S); each
    batch of n faces then runs exactly round((budget - 1) n) later iterations, split
    over the stages by the model's validation profile, on the faces that need them most
    (highest score). A single face cannot run a fraction of an iteration: alone, it quits
    on a threshold that this predictor adapts call by call so that the faces it has seen
    with this budget average the budget (`quit_head.BudgetStream`; the first face uses the
    validation faces' threshold; `reset_budget_streams` starts afresh). So a video or a
    folder run face by face spends the budget it asks for, as batches do.
    """
    def make_part(start, stop, b):
      part = crops[start:stop] if crops.shape[0] > stop - start else crops
      if b > stop - start:
        part = jnp.concatenate([part, jnp.zeros((b - stop + start,) + part.shape[1:],
                                                part.dtype)])
      return part
    return self._run_chunks(crops.shape[0], make_part, self.fast.run, ts, t_fail, budget)

  def run_sources(self, sources: crop_lib.CropSources, ts=-np.inf, t_fail=np.inf,
                  budget: float | None = None):
    """`run_fast` from the host part of the crops (`crop.prepare`, `face_sources`): the
    crop runs in the cascade's compiled program. The host part of the next chunk of
    max_batch faces is prepared while the device runs the current one."""
    def make_part(start, stop, b):
      return crop_lib.pad(crop_lib.slice_faces(sources, start, stop), b).arrays()
    return self._run_chunks(len(sources), make_part, self.fast.run_sources, ts, t_fail, budget)

  def _run_chunks(self, f: int, make_part, run, ts, t_fail, budget):
    """The cascade over F faces in chunks of at most max_batch, each padded to its
    power-of-two bucket: make_part(start, stop, bucket) -> the chunk's inputs;
    run(inputs, init, ts, t_fail, capacities=, mask=, min_bucket=) -> EarlyExitOutput."""
    fields = ("landmarks", "estimated_error", "iterations", "valid")
    if f == 0:
      n = self.model_config.num_landmarks
      return {"landmarks": np.zeros((0, n, 2), np.float32),
              "estimated_error": np.zeros(0, np.float32),
              "iterations": np.zeros(0, np.int32), "valid": np.zeros(0, bool)}
    stream = None if budget is None else self.budget_stream(budget)
    outs, pending = [], []

    def collect(out, n, target):
      got = jax.device_get(tuple(getattr(out, k) for k in fields))   # one transfer
      outs.append({k: np.asarray(v)[:n] for k, v in zip(fields, got)})
      if stream is not None:
        stream.record(outs[-1]["iterations"], target)

    for start in range(0, f, self.max_batch):
      n = min(f - start, self.max_batch)
      b = count_bucket(max(n, self.min_batch), self.max_batch)
      part = make_part(start, start + n, b)
      caps, ts_b, target = None, ts, None
      if stream is not None:
        if n == 1:
          target = stream.target()
          ts_b = max(ts, stream.threshold(target))
        else:
          caps = quit_head_lib.budget_capacities(self.quit_info, budget, n)
      mask = None if b == n else np.arange(b) < n
      # Threshold buckets from b/16 up: fewer branches to compile, at most 1/16 of the
      # batch computed for nothing.
      out = run(part, self._init, ts_b, t_fail, capacities=caps, mask=mask,
                min_bucket=max(1, b // 16))
      if stream is None:
        pending.append((out, n, target))   # dispatched: the device runs it meanwhile
      else:
        collect(out, n, target)            # a budget's account needs it before the next
    for item in pending:
      collect(*item)
    if len(outs) == 1:
      return outs[0]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

  def predict(self, images, boxes=None, ts: float = -np.inf, t_fail: float | None = None,
              budget: float | None = None, budget_mmacs: float | None = None) -> Prediction:
    """Landmarks for every box of every image.

    images: one HxWx3 uint8 RGB array, or a list of them (sizes may differ).
    boxes: for one image, a box (x0, y0, x1, y1) or a list of boxes; for a list of images,
      one such entry per image. None: every face the face finder detects (`find_faces`);
      an image without a face gives none (Prediction.boxes holds the boxes used).
    ts: early exit: a face stops after the first iteration whose quitting score (the
      estimated error, or the model's quit head) is < ts (-inf: every iteration).
    budget / budget_mmacs: the other dial, compute per face: mean iterations (1..3) or
      multiply-adds in millions; the faces that need it most get the later iterations.
    t_fail: valid = final estimated error < t_fail; None: the model's `default_t_fail` (chosen on
      validation data, see experiments.choose_t_fail; inf when the model has none).
    Both dials skip the computation of the faces that quit (they save time).
    """
    t_fail = self.default_t_fail if t_fail is None else t_fail
    for name, v in (("ts", ts), ("t_fail", t_fail)):
      if v is None or np.isnan(v):
        raise ValueError(f"{name} must be a number (use -inf/inf to disable), got {v}")
    budget = self.budget_iterations(budget, budget_mmacs)
    if boxes is None:
      photos, single = _photo_list(images)
      boxes = [self.find_faces(im) for im in photos]
      images, boxes = (photos[0], boxes[0]) if single else (photos, boxes)
    photos, image_index, all_boxes, scale, offset = _frames(images, boxes)
    size = self.model_config.image_size

    def make_part(start, stop, b):   # the host part of a chunk, while the last one runs
      return crop_lib.pad(crop_lib.prepare(photos, image_index[start:stop], scale[start:stop],
                                           offset[start:stop], size), b).arrays()
    out = self._run_chunks(len(image_index), make_part, self.fast.run_sources, ts, t_fail,
                           budget)
    crop_lm = np.asarray(out["landmarks"], np.float32)
    lm = face_frame.from_crop(crop_lm.astype(np.float64), scale.astype(np.float64),
                              offset.astype(np.float64)).astype(np.float32)
    return Prediction(landmarks=lm, estimated_error=np.asarray(out["estimated_error"], np.float32),
                      iterations=np.asarray(out["iterations"], np.int32),
                      valid=np.asarray(out["valid"], bool), image_index=image_index,
                      boxes=all_boxes, crop_landmarks=crop_lm)
