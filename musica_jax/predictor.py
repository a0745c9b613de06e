"""Photos + face boxes -> landmarks, estimated error, iterations used, valid flag (numpy,
PIL and JAX only: no TensorFlow, optax or orbax).

    from musica_jax import Predictor, read_image
    p = Predictor.default()        # or .default("musica68") / .from_model_dir(D) / .from_workdir(W)
    pred = p.predict(read_image("face.jpg"), [x0, y0, x1, y1])
    pred.landmarks[0]                                # [N, 2] image pixels (0-based, centres)

`predict` depends on its arguments only. A sequence of single faces (video, a folder
face by face) keeps a compute budget with a stream: `s = p.stream(budget=2.5)`, then
`s.predict(frame, box)` for each face (`musica_jax.budget`).

The crop (`musica_jax.crop`) runs in the cascade's jitted program, compiled once per
power-of-two face bucket, source side and dial setting; without boxes, `predict` finds the
faces with a detector (`musica_jax.detector`).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from musica_jax import budget as budget_lib
from musica_jax import crop as crop_lib
from musica_jax import face_frame
from musica_jax import fast_inference
from musica_jax import host_memory
from musica_jax import images as images_lib
from musica_jax import model_io
from musica_jax import schedules
from musica_jax.config import ModelConfig


def count_bucket(n: int, maximum: int) -> int:
  """Smallest power of two >= n (capped at maximum)."""
  return min(1 << max(int(n) - 1, 0).bit_length(), maximum)


@dataclasses.dataclass
class Prediction:
  """Per face (faces of all images, in input order; F of them)."""
  landmarks: np.ndarray        # float32 [F, N, 2] image pixels (0-based, pixel centres)
  estimated_error: np.ndarray  # float32 [F] the model's estimate of its inter-ocular NME
  iterations: np.ndarray       # int32 [F] iterations used (early exit with ts; a face that
  #                              escalated (budget_mmacs): both cascades' iterations)
  valid: np.ndarray            # bool [F] estimated_error < t_fail
  image_index: np.ndarray      # int32 [F] which input image
  boxes: np.ndarray            # float64 [F, 4] the input boxes
  crop_landmarks: np.ndarray   # float32 [F, N, 2] in the 228-px crop frame

  def __len__(self) -> int:
    return int(self.image_index.shape[0])

  def for_image(self, i: int) -> Prediction:
    sel = self.image_index == i
    return Prediction(**{f.name: getattr(self, f.name)[sel] for f in dataclasses.fields(self)})

  def to_json(self) -> list[dict]:
    return [{"image_index": int(self.image_index[f]), "box": self.boxes[f].tolist(),
             "landmarks": np.round(self.landmarks[f].astype(np.float64), 3).tolist(),
             "estimated_error": float(self.estimated_error[f]),
             "iterations": int(self.iterations[f]), "valid": bool(self.valid[f])}
            for f in range(len(self))]


ArrayLike = Any    # a numpy or jax array (or what np.asarray takes)
Images = Any       # one HxWx3 uint8 RGB array, or a list of them (sizes may differ)
Boxes = Any        # per image: (x0, y0, x1, y1) or a list of them; a list of those per list


class Predictor:
  """A trained cascade + the evaluation crop, for photos and face boxes.

  Args:
    params: stacked stage parameters (e.g. EMA parameters).
    model_config: the ModelConfig they belong to.
    mean_shape: [N, 2] initial shape in crop pixels (training-set mean).
    max_batch / min_batch: the most faces run through the cascade at once (batches are
      padded to powers of two up to it) / the smallest padded batch.
    metadata: free-form description kept on the object (`.metadata`).
    quit_params / quit_info: the model's quitting policy (`musica_jax.quit_head`): a
      learned head (or None: the network's estimated error) and its validation profile,
      which turns a budget into per-stage capacities (needed for `budget=`).
    face_finder: image -> face boxes [K, 4] (landmark-box convention) for `predict`
      without boxes; default: dlib's HOG detector with the shipped box fit, built on
      first use (`musica_jax.detector.FaceFinder`; needs the peers extra).
    default_t_fail: the failure threshold `predict` uses when given none.
  """

  def __init__(self, params: Any, model_config: ModelConfig, mean_shape: ArrayLike, *,
               max_batch: int = 64, min_batch: int = 1, metadata: dict | None = None,
               quit_params: Any = None, quit_info: dict | None = None,
               face_finder: Callable[[np.ndarray], Any] | None = None,
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
    self.init_shape = jnp.asarray(mean_shape)     # the cascade's start, on the device
    self.quit_info = quit_info
    # The failure threshold `predict` uses when given none (model.json's default_t_fail,
    # chosen on a validation split; inf: every face valid).
    self.default_t_fail = np.inf if default_t_fail is None else float(default_t_fail)
    self.fast = fast_inference.FastCascade(self.params, model_config, quit_params=quit_params)
    # On the CPU results are host memory: np.asarray reads them without device_get's
    # per-call bookkeeping (~0.18 ms at batch 1 on the 2-core CPU).
    self._host_is_device = jax.default_backend() == "cpu"
    self._face_finder = face_finder
    self._schedules: list = []     # the other schedules' (config, quitting info), from_loaded
    self._loaded = None            # the LoadedModel they are schedules of
    self._schedule_kwargs: dict = {}
    self._schedule_predictors: dict = {}   # index in _schedules -> Predictor, built on use

  def find_faces(self, image: np.ndarray) -> np.ndarray:
    """Face boxes [K, 4] (landmark-box convention) of one photo, by the face finder."""
    if self._face_finder is None:
      from musica_jax import detector  # noqa: PLC0415  (dlib is optional)
      self._face_finder = detector.FaceFinder(self.model_config.num_landmarks)
    return np.asarray(self._face_finder(images_lib.check_image(image)),
                      np.float64).reshape(-1, 4)

  # -- loading ------------------------------------------------------------------------

  @classmethod
  def from_loaded(cls, m: model_io.LoadedModel, **kwargs: Any) -> Predictor:
    """A model loaded by `model_io.load` / `load_model` or `restore.restore`."""
    meta = dict(m.metadata)
    if not m.from_workdir:
      meta.update(model_path=str(m.path), param_dtype=m.dtype)
    kwargs.setdefault("default_t_fail", m.default_t_fail)
    pred = cls(m.params, m.model_config, m.mean_shape, metadata=meta,
               quit_params=m.quit_head, quit_info=m.quit_info, **kwargs)
    if not m.from_workdir:     # the other schedules of its weights (`musica_jax.schedules`)
      pred._schedules = schedules.policies(m)
      pred._loaded, pred._schedule_kwargs = m, kwargs
    return pred

  @classmethod
  def from_model_dir(cls, path: str | os.PathLike, **kwargs: Any) -> Predictor:
    """A model directory written by `model_io.save_model` / `experiments.export_model`."""
    return cls.from_loaded(model_io.load_model(path), **kwargs)

  @classmethod
  def from_workdir(cls, workdir: str | os.PathLike, step: int | str = "latest",
                   **kwargs: Any) -> Predictor:
    """EMA weights of a training run's checkpoint ("latest", "best" or a step number);
    imports orbax and optax (`musica_jax.restore`)."""
    from musica_jax import restore  # noqa: PLC0415  (training machinery: only for workdirs)
    return cls.from_loaded(restore.restore(workdir, step), **kwargs)

  @classmethod
  def default(cls, name: str = "default", **kwargs: Any) -> Predictor:
    """A shipped model (`model_io.BUNDLED_MODELS`): "default" or "musica68" (2x the MACs)."""
    if name not in model_io.BUNDLED_MODELS:
      raise ValueError(f"no shipped model {name!r}; shipped: {list(model_io.BUNDLED_MODELS)}")
    return cls.from_loaded(model_io.load(name), **kwargs)

  def crops(self, images: Images, boxes: Boxes) -> tuple[jax.Array, np.ndarray, np.ndarray,
                                                        np.ndarray, np.ndarray]:
    """The evaluation pipeline's standardised crops and frames (`crop.face_crops`): (crops
    [F, 228, 228, 3] float32, scale [F], offset [F, 2], image_index [F], boxes [F, 4])."""
    return crop_lib.face_crops(images, boxes, self.model_config.image_size)

  # -- the dials ----------------------------------------------------------------------

  def budget_iterations(self, budget: float | None = None,
                        budget_mmacs: float | None = None) -> float | None:
    """A budget in mean iterations per face (from either form), checked; None if none."""
    return budget_lib.budget_iterations(self.model_config, self.quit_info, budget, budget_mmacs)

  def stream(self, *, budget: float | None = None,
             budget_mmacs: float | None = None) -> PredictorStream:
    """A sequence of calls (video frames, a folder face by face) that keeps `budget` (mean
    iterations, or MMACs, per face) over all the faces it sees (`PredictorStream`)."""
    p, it, _ = self.for_budget_mmacs(budget_mmacs, escalate=False)
    if p is not self:
      return PredictorStream(p, it)
    return PredictorStream(self, self.budget_iterations(budget, budget_mmacs))

  def for_budget_mmacs(self, budget_mmacs: float | None, escalate: bool = True
                       ) -> tuple[Predictor, float | None, float | None]:
    """(the predictor of the schedule that serves `budget_mmacs` best on validation, mean
    iterations for it or None: its full cascade, the escalation threshold or None: see
    `predict`); (self, None, None) when the model has one schedule or the budget is none
    (`musica_jax.schedules.choose`; `escalate=False`: without escalation points)."""
    if budget_mmacs is None or not self._schedules:
      return self, None, None
    i, it, esc = schedules.choose([(self.model_config, self.quit_info)] + self._schedules,
                                  budget_mmacs, escalate)
    if i == 0:
      return self, None, None
    if i - 1 not in self._schedule_predictors:
      chosen = schedules.with_schedule(self._loaded, self._schedules[i - 1][0].stage_patches)
      sub = Predictor.from_loaded(chosen, **self._schedule_kwargs)
      sub._schedules = []            # noqa: SLF001  (one level: the model's own decides)
      self._schedule_predictors[i - 1] = sub
    return self._schedule_predictors[i - 1], it, esc

  @staticmethod
  def _thresholds(ts: float, t_fail: float) -> None:
    for name, v in (("ts", ts), ("t_fail", t_fail)):
      if v is None or np.isnan(v):
        raise ValueError(f"{name} must be a number (use -inf/inf to disable), got {v}")

  # -- the cascade --------------------------------------------------------------------

  def run_fast(self, crops: ArrayLike, *, ts: float = -np.inf, t_fail: float = np.inf,
               budget: float | None = None, stream: budget_lib.BudgetStream | None = None
               ) -> dict[str, np.ndarray]:
    """The early-exit cascade on standardised crops [F, 228, 228, 3] that skips the
    iterations of faces that quit (`fast_inference.run_selective`); numpy out:
    "landmarks" [F, N, 2] (crop pixels), "estimated_error", "iterations", "valid".

    ts: threshold on the quitting score. budget: mean iterations per face (1..S); each
    chunk of n >= 2 faces then runs exactly round((budget - 1) n) later iterations, split
    over the stages by the model's validation profile, on the faces that need them most
    (highest score). A single face cannot run a fraction of an iteration: alone, it quits
    on the validation faces' threshold for the budget; `stream` (from `stream()`) adapts
    that threshold face by face so a sequence spends what it asks (`musica_jax.budget`).
    """
    self._thresholds(ts, t_fail)

    def make_part(start, stop, b):
      part = crops[start:stop] if crops.shape[0] > stop - start else crops
      if b > stop - start:
        part = jnp.concatenate([part, jnp.zeros((b - stop + start,) + part.shape[1:],
                                                part.dtype)])
      return part
    return self._run_chunks(crops.shape[0], make_part, self.fast.run, ts, t_fail, budget,
                            stream)

  def run_sources(self, sources: crop_lib.CropSources, *, ts: float = -np.inf,
                  t_fail: float = np.inf, budget: float | None = None,
                  stream: budget_lib.BudgetStream | None = None) -> dict[str, np.ndarray]:
    """`run_fast` from the host part of the crops (`crop.prepare`, `crop.face_sources`):
    the crop runs in the cascade's compiled program."""
    self._thresholds(ts, t_fail)

    def make_part(start, stop, b):
      return crop_lib.pad(crop_lib.slice_faces(sources, start, stop), b).arrays()
    return self._run_chunks(len(sources), make_part, self.fast.run_sources, ts, t_fail,
                            budget, stream)

  def _run_chunks(self, f: int, make_part, run, ts, t_fail, budget, stream):
    """The cascade over F faces in chunks of at most max_batch, each padded to its
    power-of-two bucket: make_part(start, stop, bucket) -> the chunk's inputs (the host
    part of the next chunk is prepared while the device runs this one);
    run(inputs, init, ts, t_fail, capacities=, mask=, min_bucket=) -> EarlyExitOutput."""
    fields = ("landmarks", "estimated_error", "iterations", "valid")
    if f == 0:
      n = self.model_config.num_landmarks
      return {"landmarks": np.zeros((0, n, 2), np.float32),
              "estimated_error": np.zeros(0, np.float32),
              "iterations": np.zeros(0, np.int32), "valid": np.zeros(0, bool)}
    if stream is not None:
      budget = stream.budget
    outs, pending = [], []

    def collect(out, n, target):
      got = ([np.asarray(getattr(out, k)) for k in fields] if self._host_is_device
             else jax.device_get(tuple(getattr(out, k) for k in fields)))   # async copies
      outs.append({k: np.asarray(v)[:n] for k, v in zip(fields, got)})
      if stream is not None:
        stream.record(outs[-1]["iterations"], target)

    for start in range(0, f, self.max_batch):
      n = min(f - start, self.max_batch)
      b = count_bucket(max(n, self.min_batch), self.max_batch)
      part = make_part(start, start + n, b)
      caps, ts_b, target = budget_lib.chunk_dial(self.quit_info, budget, n, ts, stream)
      mask = None if b == n else np.arange(b) < n
      # Threshold buckets from b/16 up: fewer branches to compile, at most 1/16 of the
      # batch computed for nothing.
      out = run(part, self.init_shape, ts_b, t_fail, capacities=caps, mask=mask,
                min_bucket=max(1, b // 16))
      if stream is None:
        pending.append((out, n, target))   # dispatched: the device runs it meanwhile
      else:
        collect(out, n, target)            # a stream's account needs it before the next
    for item in pending:
      collect(*item)
    if len(outs) == 1:
      return outs[0]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

  def predict(self, images: Images, boxes: Boxes = None, *, ts: float = -np.inf,
              t_fail: float | None = None, budget: float | None = None,
              budget_mmacs: float | None = None) -> Prediction:
    """Landmarks for every box of every image; the result depends on the arguments only.

    images: one HxWx3 uint8 RGB array, or a list of them (sizes may differ).
    boxes: for one image, a box (x0, y0, x1, y1) or a list of boxes; for a list of images,
      one such entry per image. None: every face the face finder detects (`find_faces`);
      an image without a face gives none (Prediction.boxes holds the boxes used).
    ts: early exit: a face stops after the first iteration whose quitting score (the
      estimated error, or the model's quit head) is < ts (-inf: every iteration).
    budget / budget_mmacs: the other dial, compute per face: mean iterations (1..3) or
      multiply-adds in millions; the faces that need it most get the later iterations
      (one face alone: the validation faces' threshold; keep a budget over a sequence of
      calls with `stream`). A model with cheaper schedules of its weights (quitting
      policies quit_head@...: `musica_jax.schedules`) runs, for budget_mmacs, the schedule
      most accurate at that cost on validation (its whole cascade when it costs less),
      possibly escalating: the faces whose estimated error after the cheap cascade is
      high run this model's full cascade too (the budget is then the mean over faces like
      the validation ones; harder faces escalate more often and cost more). Not in a
      `stream`, which keeps its budget exactly.
    t_fail: valid = final estimated error < t_fail; None: the model's `default_t_fail`
      (chosen on validation data, see experiments.choose_t_fail; inf when it has none).
    Both dials skip the computation of the faces that quit (they save time).
    """
    p, it, esc = self.for_budget_mmacs(budget_mmacs)
    if p is not self:          # another schedule of the same weights serves this budget
      out = p._predict(images, boxes, ts, t_fail, it, None)  # noqa: SLF001
      return out if esc is None else self._escalate(out, images, ts, t_fail, esc)
    return self._predict(images, boxes, ts, t_fail, self.budget_iterations(budget, budget_mmacs),
                         None)

  def _escalate(self, out: Prediction, images, ts, t_fail, t: float) -> Prediction:
    """`out` (a cheaper schedule's) with the faces whose estimated error is >= t (or not
    finite) run again through this model's own full cascade: their landmarks, estimate
    and validity from it, their iterations those of both cascades."""
    idx = np.flatnonzero(~(out.estimated_error < t))
    if idx.size == 0:
      return out
    photos, _ = images_lib.photo_list(images)
    again = self._predict([photos[out.image_index[j]] for j in idx],
                          [[out.boxes[j]] for j in idx], ts, t_fail, None, None)

    def put(field, value):
      a = np.array(getattr(out, field))
      a[idx] = value
      return a
    return dataclasses.replace(
        out, landmarks=put("landmarks", again.landmarks),
        estimated_error=put("estimated_error", again.estimated_error),
        valid=put("valid", again.valid), crop_landmarks=put("crop_landmarks", again.crop_landmarks),
        iterations=put("iterations", out.iterations[idx] + again.iterations))

  def _predict(self, images, boxes, ts, t_fail, budget, stream) -> Prediction:
    t_fail = self.default_t_fail if t_fail is None else t_fail
    self._thresholds(ts, t_fail)
    if boxes is None:
      photos, single = images_lib.photo_list(images)
      boxes = [self.find_faces(im) for im in photos]
      images, boxes = (photos[0], boxes[0]) if single else (photos, boxes)
    photos, image_index, all_boxes, scale, offset = images_lib.face_frames(images, boxes)
    size = self.model_config.image_size

    def make_part(start, stop, b):   # the host part of a chunk, while the last one runs
      return crop_lib.pad(crop_lib.prepare(photos, image_index[start:stop], scale[start:stop],
                                           offset[start:stop], size), b).arrays()
    out = self._run_chunks(len(image_index), make_part, self.fast.run_sources, ts, t_fail,
                           budget, stream)
    crop_lm = np.asarray(out["landmarks"], np.float32)
    lm = face_frame.from_crop(crop_lm.astype(np.float64), scale.astype(np.float64),
                              offset.astype(np.float64)).astype(np.float32)
    return Prediction(landmarks=lm, estimated_error=np.asarray(out["estimated_error"], np.float32),
                      iterations=np.asarray(out["iterations"], np.int32),
                      valid=np.asarray(out["valid"], bool), image_index=image_index,
                      boxes=all_boxes, crop_landmarks=crop_lm)


class PredictorStream:
  """A predictor over a sequence of calls that keeps a compute budget: video frames, or a
  folder run face by face (`Predictor.stream(budget=...)`). A chunk of n >= 2 faces meets
  the budget exactly; single faces quit on a threshold the stream adapts face by face so
  that the faces it has seen average the budget (`budget.BudgetStream`). Without a budget
  it is the plain predictor. Threads may share one (the account is locked)."""

  def __init__(self, predictor: Predictor, budget: float | None):
    self.predictor = predictor
    self.budget = budget
    self.account = None if budget is None else budget_lib.BudgetStream(
        predictor.quit_info, budget, predictor.model_config.num_stages)

  @property
  def faces(self) -> int:
    """Faces this stream has run (with a budget; 0 without)."""
    return 0 if self.account is None else self.account.faces

  @property
  def mean_iterations(self) -> float:
    """Mean iterations per face so far (nan before the first face, or without a budget)."""
    return float("nan") if self.account is None else self.account.mean_iterations

  def predict(self, images: Images, boxes: Boxes = None, *, ts: float = -np.inf,
              t_fail: float | None = None) -> Prediction:
    """`Predictor.predict` with the stream's budget."""
    return self.predictor._predict(images, boxes, ts, t_fail, self.budget, self.account)  # noqa: SLF001

  def run_fast(self, crops: ArrayLike, *, ts: float = -np.inf, t_fail: float = np.inf
               ) -> dict[str, np.ndarray]:
    """`Predictor.run_fast` with the stream's budget."""
    return self.predictor.run_fast(crops, ts=ts, t_fail=t_fail, budget=self.budget,
                                   stream=self.account)
