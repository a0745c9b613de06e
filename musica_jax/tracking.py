"""Landmarks through a video: the next frame's box comes from this frame's landmarks.

    tracker = FaceTracker(Predictor.default(), t_fail=0.08)
    for frame in frames:                       # HxWx3 uint8 RGB
      result = tracker.step(frame)             # TrackResult: prediction, redetected
    tracker.redetections                       # how many frames ran the detector

Per frame: every tracked face is predicted from the tight box of its landmarks in the
previous frame (the model's training convention, so no detector box mapping is needed
once a face is found). The detector (`Predictor.find_faces`) runs on the first frame,
whenever no face is tracked, and whenever a tracked face's estimated error is >= t_fail
(the model says it lost the face); the faces of that frame are then predicted again from
the detected boxes (a detection replaces every track of the frame).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from musica_jax import face_frame


@dataclasses.dataclass
class TrackResult:
  prediction: object           # predictor.Prediction for this frame (its faces)
  redetected: bool             # the detector ran on this frame
  reason: str                  # "start" | "lost" (no track) | "error>=t_fail" | "" (tracked)


class FaceTracker:
  """Tracks faces frame to frame (see the module docstring).

  predictor: a `predictor.Predictor` (its face finder detects). t_fail: the estimated-error
  threshold that triggers a re-detection. ts / budget: the early-exit dial of each frame's
  prediction. max_faces: keep at most this many faces (largest first).
  """

  def __init__(self, predictor, t_fail: float = 0.08, ts: float = -np.inf,
               budget: float | None = None, max_faces: int = 8):
    self.predictor = predictor
    self.t_fail = float(t_fail)
    self.ts = ts
    self.budget = budget
    # One stream for the whole video: the budget holds over its frames' faces.
    self.stream = predictor.stream(budget=budget)
    self.max_faces = max_faces
    self.boxes = np.zeros((0, 4))
    self.redetections = 0
    self.frames = 0

  def _predict(self, frame, boxes):
    return self.stream.predict(frame, boxes, ts=self.ts, t_fail=self.t_fail)

  def _detect(self, frame):
    boxes = self.predictor.find_faces(frame)
    if len(boxes) > self.max_faces:
      area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
      boxes = boxes[np.argsort(-area)[:self.max_faces]]
    self.redetections += 1
    return boxes

  def _inside(self, boxes, shape):
    """Boxes whose centre is still in the frame (a face that left it is dropped)."""
    h, w = shape[:2]
    c = (boxes[:, :2] + boxes[:, 2:]) / 2.0
    ok = ((c[:, 0] >= -0.5) & (c[:, 0] <= w - 0.5) & (c[:, 1] >= -0.5) & (c[:, 1] <= h - 0.5)
          & np.all(boxes[:, 2:] > boxes[:, :2], -1))
    return boxes[ok]

  def step(self, frame) -> TrackResult:
    self.frames += 1
    boxes = self._inside(self.boxes, frame.shape)
    reason = ""
    if not len(boxes):
      reason = "start" if self.frames == 1 else "lost"
      boxes = self._detect(frame)
    pred = self._predict(frame, boxes)
    if not reason and len(pred) and not np.all(pred.valid):
      reason = "error>=t_fail"
      detected = self._detect(frame)
      if len(detected):
        pred = self._predict(frame, detected)
    self.boxes = (face_frame.box_from_landmarks(pred.landmarks.astype(np.float64))
                  if len(pred) else np.zeros((0, 4)))
    return TrackResult(pred, bool(reason), reason)
