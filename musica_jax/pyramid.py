"""The image pyramid, packed into one canvas (an atlas), and bilinear patch sampling.

Why an atlas: `lax.scan` over iterations needs one input shape, but the levels are
228 / 114 / 57 px. Packing every level side by side into one zero-padded canvas (1.5x the
level-0 area instead of 3x for stacking padded levels) lets each iteration read its own
level through a scanned (origin, level) pair: no Python branch per stage.

Layout for levels 0..L, with a zero border of PAD px around each level:
  level 0 on the left; levels 1..L stacked top to bottom in a column to its right.

Coordinates are level-0 pixels throughout the cascade (pixel centres at integers). A
level-l pixel coordinate is x_l = (x_0 + 0.5) / 2^l - 0.5 (the resize convention).

Sampling: every patch is an axis-aligned 14x14 grid with unit spacing at its level, so
all its samples share one fractional offset. A patch is therefore one 15x15 window (a
single gather per patch, for all patches at once) blended with 4 constant weights:
exact bilinear interpolation, zero outside the level. Windows that would leave the
PAD-px zero border are clamped onto it: a patch far outside its level reads zeros, and
nothing ever reads a neighbouring level.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

PAD = 16  # >= the 15-px sampling window, so a clamped window reads only zeros


def downsample2(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, H/2, W/2, C] with the binomial [1, 3, 3, 1] / 8 filter.

  Output pixel j is centred on input 2j + 0.5, so the resize convention holds exactly;
  edges are replicated. A small Gaussian-like filter, as in the original Gaussian pyramid.
  """
  def along(x, axis):
    n = x.shape[axis]
    xp = jnp.concatenate([jax.lax.slice_in_dim(x, 0, 1, axis=axis), x,
                          jax.lax.slice_in_dim(x, n - 1, n, axis=axis)], axis=axis)
    # The four taps 2j .. 2j+3 as (even, odd) pairs of two contiguous slices: reshapes
    # instead of stride-2 slices, which XLA's CPU loops run about 2x slower (same sums).
    def pairs(s):
      y = jax.lax.slice_in_dim(xp, s, s + n, axis=axis)
      return y.reshape(y.shape[:axis] + (n // 2, 2) + y.shape[axis + 1:])
    a, b = pairs(0), pairs(2)
    tap = lambda y, k: jax.lax.index_in_dim(y, k, axis=axis + 1, keepdims=False)
    return (tap(a, 0) + 3 * tap(a, 1) + 3 * tap(b, 0) + tap(b, 1)) * 0.125
  return along(along(x, 1), 2)


@dataclasses.dataclass(frozen=True)
class AtlasLayout:
  """Where each pyramid level sits in the atlas (static, from the config)."""
  image_size: int
  num_levels: int

  @property
  def level_sizes(self) -> tuple[int, ...]:
    return tuple(self.image_size >> l for l in range(self.num_levels))

  @property
  def origins(self) -> tuple[tuple[int, int], ...]:
    """(row, col) of each level's top-left pixel in the atlas."""
    s = self.level_sizes
    out = [(PAD, PAD)]
    row, col = PAD, s[0] + 2 * PAD
    for l in range(1, self.num_levels):
      out.append((row, col))
      row += s[l] + PAD
    return tuple(out)

  @property
  def shape(self) -> tuple[int, int]:
    s = self.level_sizes
    if self.num_levels == 1:
      return s[0] + 2 * PAD, s[0] + 2 * PAD
    column_height = PAD + sum(s[1:]) + PAD * (self.num_levels - 1)
    return max(s[0] + 2 * PAD, column_height), s[0] + 3 * PAD + s[1]


def build_atlas(images: jax.Array, layout: AtlasLayout) -> jax.Array:
  """Level-0 crops [B, S, S, C] -> atlas [B, H, W, C] holding every pyramid level."""
  b, _, _, c = images.shape
  atlas = jnp.zeros((b, *layout.shape, c), images.dtype)
  levels = build_levels(images, layout.num_levels)
  for level, (r, col) in zip(levels, layout.origins):
    atlas = atlas.at[:, r:r + level.shape[1], col:col + level.shape[2], :].set(level)
  return atlas


def window_starts(centres: jax.Array, level, level_size, patch_size: int):
  """Top-left pixel of each patch's (patch_size+1)^2 window at its level, and the blend.

  Returns (start [..., 2] int32 (x, y) in level-l pixels, clamped to
  [-PAD, level_size + PAD - window] so that a window far outside reads only the zero
  border; frac [..., 2] the bilinear weights, shared by every sample of the patch).
  """
  scale = jnp.exp2(-jnp.asarray(level).astype(jnp.float32))
  xy = (centres + 0.5) * scale - 0.5                    # level-l pixels
  top_left = xy - (patch_size - 1) / 2.0                # first sample of the grid
  start = jnp.floor(top_left)
  frac = top_left - start
  win = patch_size + 1
  start = jnp.clip(start, -PAD, level_size + PAD - win).astype(jnp.int32)
  return start, frac


def smaller_levels(images: jax.Array, num_levels: int) -> tuple[jax.Array, ...]:
  """[B, S, S, C] -> (level 1, ..., level num_levels - 1), each half the previous."""
  out = [images]
  for _ in range(1, num_levels):
    out.append(downsample2(out[-1]))
  return tuple(out[1:])


def map_in_groups(fn, xs, group: int):
  """fn over groups of `group` faces (a `lax.map`; the largest divisor of the batch up
  to `group`), outputs concatenated back. xs: a tuple of arrays with the face axis first;
  fn: a tuple of [k, ...] arrays -> a tuple of [k, ...] arrays.

  At batch 64 this is ~3x faster on the CPU than one pass, whose 20-40 MB intermediates
  are page-faulting fresh mmaps."""
  b = xs[0].shape[0]
  k = max(1, min(group, b))
  while b % k:
    k -= 1
  if k == b:
    return tuple(fn(tuple(xs)))
  out = jax.lax.map(fn, tuple(x.reshape(b // k, k, *x.shape[1:]) for x in xs))
  return tuple(x.reshape(b, *x.shape[2:]) for x in out)


def build_levels(images: jax.Array, num_levels: int, group: int = 4) -> list[jax.Array]:
  """[B, S, S, C] -> [level 0 (the input), level 1, ...], each half the previous,
  computed in groups of `group` faces (`map_in_groups`)."""
  if num_levels == 1:
    return [images]
  return [images, *map_in_groups(lambda t: smaller_levels(t[0], num_levels), (images,), group)]


def gather_patches_cm(padded: jax.Array, face: jax.Array, start: jax.Array, frac: jax.Array,
                      patch_size: int, origin) -> jax.Array:
  """Bilinear patches in channel-major, patch-minor layout [C, ps, ps, m].

  Args:
    padded: [k, H, W, C], k faces' images holding the level with a zero border of at
      least PAD px (an atlas from `build_atlas`).
    face: [m] int, the face (index into `padded`) of each patch.
    start, frac: [m, 2] from `window_starts` (level pixels, (x, y)).
    origin: (row, col) of the level's top-left pixel in `padded` (may be traced).
  Same samples and the same arithmetic as `sample_patches` (one window gather per patch,
  four constant weights); only the memory layout of the result differs.
  """
  c = padded.shape[-1]
  win = patch_size + 1
  rows = start[:, 1] + origin[0]
  cols = start[:, 0] + origin[1]
  w = jax.vmap(lambda f, r, q: jax.lax.dynamic_slice(
      padded, (f, r, q, 0), (1, win, win, c))[0])(face, rows, cols)   # [m, win, win, C]
  return _blend_cm(w, frac)


def gather_patches_level_cm(level: jax.Array, face: jax.Array, start: jax.Array,
                            frac: jax.Array, patch_size: int) -> jax.Array:
  """`gather_patches_cm` from one pyramid level WITHOUT a zero border.

  level: [k, h, w, C], one level of a few faces (e.g. a chunk of level-0 crops); face,
  start, frac as `gather_patches_cm`. The level is given its PAD-px zero border here, so
  the patches are exactly the atlas's. Used by the fast early-exit paths, which keep each
  level in its own array and pad only the faces of one chunk at a time: padding (or
  packing into an atlas) every face of a batch is a fresh 50-80 MB buffer at batch 64,
  whose page faults cost as much as an iteration on a 2-core CPU.
  """
  padded = jnp.pad(level, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
  return gather_patches_cm(padded, face, start, frac, patch_size, origin=(PAD, PAD))


def _blend_cm(w: jax.Array, frac: jax.Array) -> jax.Array:
  """Windows [m, win, win, C] + shared fractions [m, 2] -> patches [C, ps, ps, m]."""
  w = w.transpose(3, 1, 2, 0)                                         # [C, win, win, m]
  fx, fy = frac[:, 0], frac[:, 1]
  top = w[:, :-1, :-1] * (1 - fx) + w[:, :-1, 1:] * fx
  bottom = w[:, 1:, :-1] * (1 - fx) + w[:, 1:, 1:] * fx
  # Materialise the patches once: otherwise XLA fuses this transposing blend into each
  # of the 9 im2col slices of conv1 and recomputes it 9 times from the strided windows
  # (measured: ~1/6 of a training step).
  out = top * (1 - fy) + bottom * fy
  return jax.lax.optimization_barrier(out)


def sample_patches(atlas: jax.Array, centres: jax.Array, level: jax.Array,
                   origin: jax.Array, level_size: jax.Array, patch_size: int) -> jax.Array:
  """Bilinear patches around `centres` from one pyramid level of the atlas.

  Args:
    atlas: [B, H, W, C].
    centres: [B, P, 2] (x, y) in level-0 pixels.
    level: scalar int, the pyramid level to read.
    origin: [2] int (row, col) of that level in the atlas.
    level_size: scalar int, that level's side in pixels.
    patch_size: static patch side (14).
  Returns:
    [B, P, patch_size, patch_size, C].
  """
  c = atlas.shape[-1]
  start, frac = window_starts(centres, level, level_size, patch_size)
  win = patch_size + 1
  rows = start[..., 1] + origin[0]
  cols = start[..., 0] + origin[1]

  def windows(img, r, q):
    return jax.vmap(lambda r1, q1: jax.lax.dynamic_slice(img, (r1, q1, 0), (win, win, c)))(r, q)

  w = jax.vmap(windows)(atlas, rows, cols)              # [B, P, win, win, C]
  fx = frac[..., 0][..., None, None, None]
  fy = frac[..., 1][..., None, None, None]
  top = w[..., :-1, :-1, :] * (1 - fx) + w[..., :-1, 1:, :] * fx
  bottom = w[..., 1:, :-1, :] * (1 - fx) + w[..., 1:, 1:, :] * fx
  return top * (1 - fy) + bottom * fy
