"""Landmark schemes: which point is what, how points mirror, which carry a patch.

A scheme is plain data. The two published markups (iBUG 68 / 300W and WFLW 98) are
built below; a custom scheme for any number of points is made the same way with
`LandmarkScheme(...)` and goes through `validate()`.

Patch subsets. The paper's cascade crops patches around a subset of the landmarks
and still regresses every landmark. Published subsets: 68 -> 19 and 98 -> 49 (every
even index). The 68 -> 34 and 98 -> 44 subsets were never published; ours are chosen so
that (a) every face part (contour, both brows, nose, both eyes, mouth) keeps patches and
(b) the subset is closed under the horizontal-flip permutation, so a flipped training
face has its patches at the mirror landmarks of the same subset.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class LandmarkScheme:
  """Everything the library needs to know about a landmark markup.

  Attributes:
    name: short identifier, e.g. "ibug68".
    num_points: N.
    groups: face part -> landmark indices (for drawing and documentation).
    flip_permutation: index i of a horizontally flipped face holds the landmark
      flip_permutation[i] of the original (an involution).
    left_eye, right_eye: landmark indices whose mean is the eye centre
      ("inter-pupil" normalisation). Left/right as seen in the image.
    outer_eye_corners: the two indices of the outer eye corners ("inter-ocular").
    patch_subsets: number of patches -> landmark indices that carry a patch.
  """
  name: str
  num_points: int
  groups: Mapping[str, tuple[int, ...]]
  flip_permutation: tuple[int, ...]
  left_eye: tuple[int, ...]
  right_eye: tuple[int, ...]
  outer_eye_corners: tuple[int, int]
  patch_subsets: Mapping[int, tuple[int, ...]]

  def __hash__(self):  # the mappings are not hashable; these fields identify a scheme
    return hash((self.name, self.num_points, self.flip_permutation))

  def validate(self) -> "LandmarkScheme":
    """Raises ValueError when the scheme is inconsistent; returns self."""
    n = self.num_points
    perm = np.asarray(self.flip_permutation)
    if perm.shape != (n,) or sorted(perm.tolist()) != list(range(n)):
      raise ValueError(f"scheme {self.name}: flip_permutation must be a permutation "
                       f"of range({n})")
    if not np.array_equal(perm[perm], np.arange(n)):
      raise ValueError(f"scheme {self.name}: flip_permutation is not an involution")
    def check(what, idx):
      idx = list(idx)
      if not idx or min(idx) < 0 or max(idx) >= n:
        raise ValueError(f"scheme {self.name}: {what} indices out of range(0, {n})")
      if len(set(idx)) != len(idx):
        raise ValueError(f"scheme {self.name}: {what} has repeated indices")
    for g, idx in self.groups.items():
      check(f"group {g!r}", idx)
    check("left_eye", self.left_eye)
    check("right_eye", self.right_eye)
    check("outer_eye_corners", self.outer_eye_corners)
    if len(self.outer_eye_corners) != 2:
      raise ValueError(f"scheme {self.name}: outer_eye_corners needs 2 indices")
    if n not in self.patch_subsets:
      raise ValueError(f"scheme {self.name}: the full patch subset ({n}) is missing")
    for k, idx in self.patch_subsets.items():
      check(f"patch subset {k}", idx)
      if len(idx) != k:
        raise ValueError(f"scheme {self.name}: patch subset {k} has {len(idx)} indices")
    return self

  def patch_indices(self, num_patches: int) -> tuple[int, ...]:
    """The landmark indices that carry a patch for a model with `num_patches`."""
    if num_patches not in self.patch_subsets:
      raise ValueError(
          f"scheme {self.name} has no {num_patches}-patch subset; "
          f"available: {sorted(self.patch_subsets)}")
    return tuple(self.patch_subsets[num_patches])


def _pairs_to_permutation(n: int, pairs: Sequence[tuple[int, int]]) -> tuple[int, ...]:
  perm = list(range(n))
  for a, b in pairs:
    perm[a], perm[b] = b, a
  return tuple(perm)


def _published(name: str, num_points: int, spans: Mapping[str, tuple[int, int]],
               mirror_pairs: Sequence[tuple[int, int]], outer_eye_corners: tuple[int, int],
               subsets: Mapping[int, Sequence[int]]) -> LandmarkScheme:
  """A markup whose face parts are runs of consecutive indices: `spans` maps each part to
  [start, stop); the eyes are the parts "left_eye" and "right_eye"; `subsets` are the
  patch subsets besides the full one."""
  groups = {part: tuple(range(a, b)) for part, (a, b) in spans.items()}
  return LandmarkScheme(
      name=name, num_points=num_points, groups=groups,
      flip_permutation=_pairs_to_permutation(num_points, mirror_pairs),
      left_eye=groups["left_eye"], right_eye=groups["right_eye"],
      outer_eye_corners=outer_eye_corners,
      patch_subsets={num_points: tuple(range(num_points)),
                     **{k: tuple(v) for k, v in subsets.items()}},
  ).validate()


IBUG68_SPANS = {"jaw": (0, 17), "left_brow": (17, 22), "right_brow": (22, 27),
                "nose_bridge": (27, 31), "nostrils": (31, 36), "left_eye": (36, 42),
                "right_eye": (42, 48), "outer_mouth": (48, 60), "inner_mouth": (60, 68)}
IBUG68_MIRROR = ([(i, 16 - i) for i in range(8)]                          # jaw
                 + [(17 + i, 26 - i) for i in range(5)]                   # brows
                 + [(31, 35), (32, 34)]                                   # nostrils
                 + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
                 + [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58)]     # outer mouth
                 + [(60, 64), (61, 63), (65, 67)])                        # inner mouth
IBUG68_SUBSETS = {
    # Reference notes (the authors' code).
    19: (0, 4, 8, 12, 16, 17, 21, 22, 26, 36, 39, 42, 45, 31, 34, 48, 51, 54, 57),
    # Ours, the phone model (paper 4.3 on 68 points), flip-closed: jaw every fourth
    # point (5), brow ends (4), nose bridge top, nose bottom centre, nostril ends (4),
    # eye corners and the outer upper lid points (6), mouth corners and centres (4).
    23: (0, 4, 8, 12, 16, 17, 21, 22, 26, 27, 33, 31, 35,
         36, 37, 39, 42, 44, 45, 48, 51, 54, 57),
    # Ours, flip-closed: jaw every other point (9), brow ends and middles (6),
    # nose bridge top/tip + nostril ends and centre (5), four points per eye (8),
    # mouth corners, outer top/bottom centres, inner top/bottom centres (6).
    34: (0, 2, 4, 6, 8, 10, 12, 14, 16,
         17, 19, 21, 22, 24, 26,
         27, 30, 31, 33, 35,
         36, 38, 39, 41, 42, 43, 45, 46,
         48, 51, 54, 57, 62, 66),
}

WFLW98_SPANS = {"contour": (0, 33), "left_brow": (33, 42), "right_brow": (42, 51),
                "nose_bridge": (51, 55), "nostrils": (55, 60), "left_eye": (60, 68),
                "right_eye": (68, 76), "outer_mouth": (76, 88), "inner_mouth": (88, 96),
                "pupils": (96, 98)}
WFLW98_MIRROR = ([(i, 32 - i) for i in range(16)]                         # contour
                 + [(33, 46), (34, 45), (35, 44), (36, 43), (37, 42),     # brows
                    (38, 50), (39, 49), (40, 48), (41, 47)]
                 + [(55, 59), (56, 58)]                                   # nostrils
                 + [(60, 72), (61, 71), (62, 70), (63, 69), (64, 68),     # eyes
                    (65, 75), (66, 74), (67, 73)]
                 + [(76, 82), (77, 81), (78, 80), (83, 87), (84, 86)]     # outer mouth
                 + [(88, 92), (89, 91), (93, 95)]                         # inner mouth
                 + [(96, 97)])                                            # pupils
WFLW98_SUBSETS = {
    # Reference notes: every even index.
    49: tuple(range(0, 98, 2)),
    # Ours, flip-closed: contour every 4th point (9), brows (8), nose (5),
    # four points per eye (8), pupils (2), mouth (12).
    44: (0, 4, 8, 12, 16, 20, 24, 28, 32,
         33, 35, 37, 39, 42, 44, 46, 49,
         51, 54, 55, 57, 59,
         60, 62, 64, 66, 68, 70, 72, 74,
         96, 97,
         76, 77, 79, 81, 82, 83, 85, 87, 88, 90, 92, 94),
}


IBUG68 = _published("ibug68", 68, IBUG68_SPANS, IBUG68_MIRROR, (36, 45), IBUG68_SUBSETS)
WFLW98 = _published("wflw98", 98, WFLW98_SPANS, WFLW98_MIRROR, (60, 72), WFLW98_SUBSETS)
SCHEMES = {s.name: s for s in (IBUG68, WFLW98)}


def get_scheme(name_or_points) -> LandmarkScheme:
  """Looks a scheme up by name ("ibug68", "wflw98") or by point count (68, 98)."""
  if isinstance(name_or_points, int) or str(name_or_points).isdigit():
    n = int(name_or_points)
    for s in SCHEMES.values():
      if s.num_points == n:
        return s
    raise ValueError(f"no built-in scheme has {n} points; built-in: "
                     f"{ {s.name: s.num_points for s in SCHEMES.values()} }")
  if name_or_points not in SCHEMES:
    raise ValueError(f"unknown landmark scheme {name_or_points!r}; "
                     f"known: {sorted(SCHEMES)}")
  return SCHEMES[name_or_points]
