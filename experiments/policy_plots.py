"""Plots of the early-exit analysis (paper Figures 1, 2 and 7), matplotlib headless."""
from __future__ import annotations

import pathlib

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

BLUE, RED, GREEN = "#1f5fbf", "#d62728", "#2ca02c"


def _save(fig, path) -> None:
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path)
  plt.close(fig)


def figure2(sw: dict, comparison: dict | None, path, title: str = "",
            nme_label: str = "NME (%)") -> None:
  """Mean iterations vs NME for ours, random (mean +- std of the draws) and the oracle,
  with the paper's green / yellow / red reading points when `comparison` has them."""
  x = np.asarray(sw["mean_iterations"])
  order = np.argsort(x, kind="stable")
  x = x[order]
  get = lambda k: np.asarray(sw[k])[order]
  fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=110)
  rnd, std = get("nme_random"), get("nme_random_std")
  ax.fill_between(x, rnd - std, rnd + std, color=RED, alpha=0.15, lw=0)
  ax.plot(x, rnd, color=RED, label="random assignment (same counts, 50 draws)")
  ax.plot(x, get("nme_policy"), color=BLUE, label="ours: quit when E < Ts")
  if "nme_oracle" in sw:
    ax.plot(x, get("nme_oracle"), color=GREEN, label="oracle (best assignment, same counts)")
  if "nme_oracle_sequential" in sw:
    ax.plot(x, get("nme_oracle_sequential"), color=GREEN, ls=":", lw=1,
            label="true error in place of E (same counts)")
  c = comparison or {}
  it = c.get("mean_iterations")
  if c.get("random_nme") is not None:
    ax.plot([it], [c["random_nme"]], "o", color="#00a000", ms=8, mec="k", zorder=5,
            label=f"random @ {it:g} it: {c['random_nme']:.3f}")
  if c.get("policy_nme") is not None:
    gain = c.get("relative_gain")
    ax.plot([it], [c["policy_nme"]], "o", color="#ffd000", ms=8, mec="k", zorder=5,
            label=f"ours @ {it:g} it: {c['policy_nme']:.3f}"
                  + (f" ({gain * 100:+.1f}% vs random)" if gain is not None else ""))
  if c.get("policy_iterations_to_match") is not None:
    m = c["policy_iterations_to_match"]
    ax.plot([m], [c["random_nme"]], "o", color="#ff3030", ms=8, mec="k", zorder=5,
            label=f"ours matches random @ {m:.2f} it")
  ax.set_xlabel("mean iterations per face")
  ax.set_ylabel(nme_label)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7.5, loc="upper right")
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  _save(fig, path)


def t_fail_plot(t_fail: dict, path, title: str = "",
                nme_label: str = "NME of valid faces (%)") -> None:
  """Fraction declared invalid vs the NME of the remaining faces (ours vs the oracle)."""
  fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
  x = np.asarray(t_fail["invalid_fraction"]) * 100
  ax.plot(x, t_fail["nme_remaining"], color=BLUE, label="ours: invalid when final E >= Tf")
  ax.plot(x, t_fail["nme_remaining_oracle"], color=GREEN, label="oracle: drop the worst faces")
  ax.axhline(t_fail["nme_all"], color=RED, ls="--", lw=1, label="random rejection (expected)")
  ax.set_xlabel("faces declared invalid (%)")
  ax.set_ylabel(nme_label)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  _save(fig, path)


def estimate_scatter(estimated, true_error, path, title: str = "") -> None:
  """Scatter of estimated vs true error, one panel per iteration."""
  estimated = np.asarray(estimated)
  true_error = np.asarray(true_error)
  s = estimated.shape[0]
  fig, axes = plt.subplots(1, s, figsize=(3.2 * s, 3.3), dpi=110, squeeze=False)
  hi = float(max(np.percentile(estimated, 99.5), np.percentile(true_error, 99.5))) * 1.05
  for i, ax in enumerate(axes[0]):
    ax.scatter(true_error[i], estimated[i], s=5, alpha=0.5, color=BLUE)
    ax.plot([0, hi], [0, hi], color="k", lw=0.8, ls="--")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_xlabel("true error (training target)")
    if i == 0:
      ax.set_ylabel("estimated error E")
    ax.set_title(f"iteration {i + 1}", fontsize=9)
    ax.grid(alpha=0.3)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  _save(fig, path)


def figure7(variants: list[dict], path, title: str = "", nme_label: str = "NME (%)",
            x_label: str = "multiply-adds per face (M), mean over the split") -> None:
  """NME vs MMACs (or what `x_label` names, in each variant's "mmacs"), one segmented line
  per variant (its Ts sweep); the full cascade and the one-iteration point are marked."""
  fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=110)
  for v in variants:
    x = np.asarray(v["mmacs"])
    y = np.asarray(v["nme"])
    order = np.argsort(x, kind="stable")
    line, = ax.plot(x[order], y[order], "-", marker=".", ms=3, lw=1.2, label=v["name"])
    ax.plot([x.max()], [y[np.argmax(x)]], "s", color=line.get_color(), ms=6)
  ax.set_xlabel(x_label)
  ax.set_ylabel(nme_label)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, title="square: full cascade", title_fontsize=7)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  _save(fig, path)


def display_image(image) -> np.ndarray:
  """A standardised crop (zero mean, unit std per image) back to [0, 1] for display.

  Per-image standardisation is affine, so a per-image min-max stretch recovers the
  original up to contrast (exact for images that spanned 0..255)."""
  image = np.asarray(image, np.float64)
  lo, hi = image.min(), image.max()
  return np.clip((image - lo) / max(hi - lo, 1e-9), 0.0, 1.0)


def figure1(images, shapes, estimated, ts: float, path, title: str = "",
            error_scale: float = 1.0, error_fmt: str = "{:.3f}", ground_truth=None) -> None:
  """Paper Figure 1: one column per face, one row per iteration.

  Args:
    images: [K, H, W, 3] standardised crops.
    shapes: [S, K, N, 2] landmarks after each iteration (crop pixels, x then y).
    estimated: [S, K] estimated error after each iteration.
    ts: success threshold: a face quits after the first iteration with E < ts.
    error_scale, error_fmt: how E is printed (E * error_scale).
    ground_truth: optional [K, N, 2], drawn faintly.
  The estimate that triggers the exit is green; later iterations are greyed out; the
  output (exit iteration) is framed in blue.
  """
  shapes = np.asarray(shapes)
  estimated = np.asarray(estimated)
  s, k = estimated.shape
  below = estimated < ts
  exit_idx = np.where(below.any(0), below.argmax(0), s - 1)
  fig, axes = plt.subplots(s, k, figsize=(1.9 * k, 2.05 * s + 0.4), dpi=110, squeeze=False)
  for j in range(k):
    img = display_image(images[j])
    for i in range(s):
      ax = axes[i, j]
      after = i > exit_idx[j]
      shown = img if not after else 0.25 * img.mean(-1, keepdims=True).repeat(3, -1) + 0.7
      ax.imshow(shown, interpolation="bilinear")
      if ground_truth is not None and not after:
        ax.scatter(ground_truth[j, :, 0], ground_truth[j, :, 1], s=2, c="w", alpha=0.6, lw=0)
      ax.scatter(shapes[i, j, :, 0], shapes[i, j, :, 1], s=3, lw=0,
                 c="#bbbbbb" if after else "#ff2020")
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_xlim(0, img.shape[1])
      ax.set_ylim(img.shape[0], 0)
      quit_here = i == exit_idx[j] and below[i, j]
      color = "#999999" if after else ("#109010" if quit_here else "k")
      ax.set_title(error_fmt.format(estimated[i, j] * error_scale), fontsize=9, color=color,
                   fontweight="bold" if quit_here else "normal", pad=2)
      for spine in ax.spines.values():
        if i == exit_idx[j]:
          spine.set_edgecolor("#1f5fbf")
          spine.set_linewidth(3.5)
        else:
          spine.set_edgecolor("#cccccc" if after else "k")
          spine.set_linewidth(0.6)
      if j == 0:
        ax.set_ylabel(f"iteration {i + 1}", fontsize=9)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  _save(fig, path)


def reliability_plot(estimated, true_nme, path, title: str = "") -> dict:
  """Reliability diagram: faces binned by E (deciles), mean true NME per bin vs mean E."""
  e, t = np.asarray(estimated, np.float64), np.asarray(true_nme, np.float64)
  edges = np.quantile(e, np.linspace(0, 1, 11))
  which = np.clip(np.searchsorted(edges, e, side="right") - 1, 0, 9)
  bins = [{"mean_estimated": float(e[which == k].mean()), "mean_true": float(t[which == k].mean()),
           "faces": int((which == k).sum())} for k in range(10) if (which == k).any()]
  fig, ax = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
  ax[0].scatter(e * 100, t * 100, s=5, alpha=0.4, label="faces")
  ax[0].plot([b["mean_estimated"] * 100 for b in bins], [b["mean_true"] * 100 for b in bins],
             "o-", color="C3", label="decile means")
  lim = max(np.quantile(e, 0.99), np.quantile(t, 0.99)) * 100
  ax[0].plot([0, lim], [0, lim], "k--", lw=0.8, label="perfect calibration")
  ax[0].set(xlim=(0, lim), ylim=(0, lim), xlabel="estimated error E (%)",
            ylabel="true error (%, the estimate's target)", title="reliability")
  ax[0].legend(fontsize=8)
  order = np.argsort(-e)
  frac = np.arange(1, e.size + 1) / e.size
  ax[1].plot(frac * 100, np.cumsum(t[order]) / np.arange(1, e.size + 1) * 100,
             label="faces of highest E first")
  ax[1].plot(frac * 100, np.cumsum(np.sort(t)[::-1]) / np.arange(1, e.size + 1) * 100, "--",
             label="oracle (highest true error first)")
  ax[1].axhline(t.mean() * 100, color="grey", lw=0.8, label="random order")
  ax[1].set(xlabel="faces flagged (%)", ylabel="mean true error of flagged faces (%)",
            title="what a threshold on E flags")
  ax[1].legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  _save(fig, path)
  return {"bins": bins}
