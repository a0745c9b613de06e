"""The oracle of the early-exit analysis: the best assignment with given counts (exact).

Pure numpy, on the arrays of `early_exit_assignment`. The oracle takes the cost profile
`counts` [S] of a policy (faces quitting at each iteration) and assigns faces to iterations
using the true error `nme` [S, F]. Definition used here: the assignment with exactly those
counts that minimises the mean true NME (an optimal transportation / capacitated
assignment problem, solved exactly by negative-cycle cancelling, see `oracle_assignment`).
It is the best any policy -- causal or not -- can do with that computation profile, so it
bounds every curve from below, which is what "marks the best possible assignment" asks
for. It is *not* "apply the rule to the true error": a face whose error is still high
after iteration 1 but that later iterations do not improve is better stopped early, and
its slot given to a face that gains more.

`oracle_sequential_assignment` is that other, weaker reading (fill iteration 1 with the
counts[0] faces of lowest true error after iteration 1, then iteration 2 from the rest,
...); it is reported for reference but is not a bound.
"""
from __future__ import annotations

import itertools

import numpy as np

from experiments import early_exit_assignment as assignment


def oracle_sequential_assignment(nme, counts) -> np.ndarray:
  """Iteration s gets the counts[s] faces of lowest nme[s] among those not yet assigned.

  The early-exit rule with the true error in place of the estimate, at the given counts.
  Ties go to the lower face index.
  """
  nme = assignment.check_2d(nme, "nme")
  s, f = nme.shape
  counts = assignment.check_counts(counts, s, f)
  exit_idx = np.full(f, s - 1, np.int64)
  left = np.arange(f)
  for it in range(s - 1):
    order = np.argsort(nme[it, left], kind="stable")
    take = left[order[:counts[it]]]
    exit_idx[take] = it
    left = np.sort(left[order[counts[it]:]])
  return exit_idx


def _simple_cycles(s: int) -> list[tuple[int, ...]]:
  """Every simple directed cycle of the complete graph on s nodes (each listed once)."""
  cycles = []
  for k in range(2, s + 1):
    for nodes in itertools.combinations(range(s), k):
      first, rest = nodes[0], nodes[1:]
      for perm in itertools.permutations(rest):
        cycles.append((first,) + perm)
  return cycles


def oracle_assignment(nme, counts, init=None, max_rounds: int = 1_000_000) -> np.ndarray:
  """The assignment with exactly `counts` faces per iteration of minimum total true error.

  Exact. Start: `init` (a feasible assignment, e.g. the policy's) or the sequential
  oracle. Improve by cancelling negative cycles: moving face g from iteration a to b costs
  nme[b, g] - nme[a, g]; a set of moves a0 -> a1 -> ... -> a0 (one face out of each
  iteration on the cycle) keeps the counts. The assignment is optimal iff no such cycle
  has negative total cost (the optimality condition of min-cost flow: any negative cycle
  of the residual graph decomposes into simple ones, and a simple one visits each
  iteration at most once, using the cheapest face to move along each of its edges). With
  few iterations every simple cycle is enumerated and the most negative one is cancelled
  each round.
  """
  nme = assignment.check_2d(nme, "nme")
  s, f = nme.shape
  counts = assignment.check_counts(counts, s, f)
  if s > 7:
    raise ValueError(f"oracle_assignment enumerates cycles; S={s} > 7 iterations unsupported")
  if init is None:
    exit_idx = oracle_sequential_assignment(nme, counts)
  else:
    exit_idx = np.array(init, np.int64, copy=True)
    if not np.array_equal(assignment.counts_of(exit_idx, s), counts):
      raise ValueError("init does not have the requested counts")
  if s == 1:
    return exit_idx
  cycles = _simple_cycles(s)
  cycle_edges = [np.array([(c[i], c[(i + 1) % len(c)]) for i in range(len(c))])
                 for c in cycles]
  faces = np.arange(f)
  tol = 1e-12 * max(1.0, float(np.abs(nme).max()))
  for _ in range(max_rounds):
    delta = nme - nme[exit_idx, faces]           # [S, F] cost of moving face f to b
    best = np.full((s, s), np.inf)
    arg = np.zeros((s, s), np.int64)
    for a in range(s):
      members = np.flatnonzero(exit_idx == a)
      if members.size:
        sub = delta[:, members]
        pos = sub.argmin(axis=1)
        best[a] = sub[np.arange(s), pos]
        arg[a] = members[pos]
    costs = np.array([best[e[:, 0], e[:, 1]].sum() for e in cycle_edges])
    k = int(np.argmin(costs))
    if not costs[k] < -tol:
      return exit_idx
    for a, b in cycle_edges[k]:
      exit_idx[arg[a, b]] = b
  raise RuntimeError("oracle_assignment did not converge")
