import numpy as np
import pytest

from musica_jax import schemes


@pytest.mark.parametrize("scheme", [schemes.IBUG68, schemes.WFLW98])
def test_flip_is_involution(scheme):
  perm = np.asarray(scheme.flip_permutation)
  assert sorted(perm.tolist()) == list(range(scheme.num_points))
  np.testing.assert_array_equal(perm[perm], np.arange(scheme.num_points))
  assert np.any(perm != np.arange(scheme.num_points))


@pytest.mark.parametrize("scheme", [schemes.IBUG68, schemes.WFLW98])
def test_flip_maps_parts_onto_mirror_parts(scheme):
  perm = np.asarray(scheme.flip_permutation)
  g = scheme.groups
  assert sorted(perm[list(g["left_eye"])].tolist()) == sorted(g["right_eye"])
  assert sorted(perm[list(g["right_eye"])].tolist()) == sorted(g["left_eye"])
  assert sorted(perm[list(g["left_brow"])].tolist()) == sorted(g["right_brow"])
  a, b = scheme.outer_eye_corners
  assert perm[a] == b
  # Nose bridge points lie on the symmetry axis.
  for i in g["nose_bridge"]:
    assert perm[i] == i


def test_ibug_flip_specific_pairs():
  perm = schemes.IBUG68.flip_permutation
  assert perm[0] == 16 and perm[8] == 8 and perm[17] == 26 and perm[36] == 45
  assert perm[48] == 54 and perm[57] == 57 and perm[60] == 64 and perm[66] == 66


def test_flip_of_a_symmetric_face_is_itself():
  """Mirror a synthetic shape that is symmetric by construction: flip + permute = identity."""
  rng = np.random.default_rng(0)
  scheme = schemes.IBUG68
  perm = np.asarray(scheme.flip_permutation)
  pts = rng.normal(size=(68, 2))
  # Make it symmetric: each point's partner is its mirror image about x = 0.
  for i in range(68):
    j = perm[i]
    if j > i:
      pts[j] = pts[i] * [-1, 1]
    elif j == i:
      pts[i, 0] = 0.0
  flipped = (pts * [-1, 1])[perm]
  np.testing.assert_allclose(flipped, pts)


@pytest.mark.parametrize("scheme,ours,published", [(schemes.IBUG68, 34, 19),
                                                   (schemes.WFLW98, 44, 49)])
def test_patch_subsets(scheme, ours, published):
  assert len(set(scheme.patch_indices(published))) == published
  idx = set(scheme.patch_indices(ours))
  assert len(idx) == ours
  for part, members in scheme.groups.items():
    assert idx & set(members), f"{scheme.name}/{ours}: no patch on {part}"
  # Our subsets are closed under the flip, so flip augmentation maps patches onto patches.
  perm = np.asarray(scheme.flip_permutation)
  assert set(perm[sorted(idx)].tolist()) == idx


def test_custom_scheme_and_errors():
  s = schemes.LandmarkScheme(
      name="five", num_points=5, groups={"eyes": (0, 1), "nose": (2,), "mouth": (3, 4)},
      flip_permutation=(1, 0, 2, 4, 3), left_eye=(0,), right_eye=(1,),
      outer_eye_corners=(0, 1), patch_subsets={5: (0, 1, 2, 3, 4), 3: (0, 1, 2)}).validate()
  assert s.patch_indices(3) == (0, 1, 2)
  with pytest.raises(ValueError, match="no 4-patch subset"):
    s.patch_indices(4)
  with pytest.raises(ValueError, match="involution"):
    schemes.LandmarkScheme(
        name="bad", num_points=3, groups={}, flip_permutation=(1, 2, 0), left_eye=(0,),
        right_eye=(1,), outer_eye_corners=(0, 1), patch_subsets={3: (0, 1, 2)}).validate()
  with pytest.raises(ValueError, match="unknown landmark scheme"):
    schemes.get_scheme("nope")
  assert schemes.get_scheme(98) is schemes.WFLW98
