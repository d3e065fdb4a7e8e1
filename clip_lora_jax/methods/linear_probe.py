"""Linear probe (Radford et al., 2021; the CoOp repository's `lpclip/linear_probe.py`): L2
logistic regression on the frozen, unnormalised image embeddings of the clean training shots,

    logits = f @ W^T + b,     (W, b) = argmin  C * sum_i CE(f_i @ W^T + b, y_i) + 0.5 * ||W||^2

the objective of sklearn's `LogisticRegression(solver="lbfgs", penalty="l2", C=C)` (multinomial;
the intercept is not penalised), solved in JAX by L-BFGS (`optax.lbfgs`, zoom line search)
from zero, minimising the same objective divided by C * N, to max |gradient| <= `tol` or
`max_iter` iterations (sklearn's stopping rule, and its 1000 iterations). With two classes
sklearn fits a binomial model: the multinomial one at C / 2 has its very probabilities.

C is chosen on the validation shots as the official script does: the best of the coarse grid
1e6, 1e4, ..., 1e-6 (the first of equals), then `search_steps` (8) bisection steps in log space
between 0.1 and 10 times that peak; each step fits both ends, keeps the better one (the left
one on a tie) as the choice, and halves the interval towards it; the choice of the last step is
refit on the training shots and kept. Nothing trains afterwards (no `loss`): `init` searches
and fits. The parameter pytree

    {"w": (C, E), "b": (C,), "frozen": {"c": ()}}

counts C x (E + 1) parameters; "c" records the chosen regularisation.

Departures from the official code: the features are those of `config.model` (the script
hard-codes RN50); the validation shots are the run's (`config.shots` and the dataset's split,
not the script's 1/2/4/4/4 shots drawn with numpy); float32 instead of float64; the solver is
L-BFGS with optax's zoom line search, not scipy's L-BFGS-B (same objective and stopping rule,
so the same optimum up to the tolerance); on ImageNet the script tunes C on the test images,
here on the validation shots (no search ever sees the test split). `linear_probe.c` skips the
search (e.g. for a dataset without validation shots).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from clip_lora_jax.errors import UserError
from clip_lora_jax.methods import feature_cache
from clip_lora_jax.model import Params

SECTION = "linear_probe"
INPUT = "embedding"
GRID = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)  # lpclip's coarse search over C.


@dataclasses.dataclass(frozen=True)
class Config(feature_cache.MethodConfig):
  """grid: the coarse values of C; search_steps: bisection steps after it (0: the grid's best);
  max_iter, tol: the solver's iteration cap and gradient tolerance (sklearn's 1000, 1e-4);
  c: a fixed C instead of the search (None: search on the validation shots)."""
  grid: tuple[float, ...] = GRID
  search_steps: int = 8
  max_iter: int = 1000
  tol: float = 1e-4
  c: float | None = None

  def __post_init__(self):
    if not self.grid or not all(_positive(c) for c in self.grid):
      raise UserError(f"linear_probe.grid={self.grid!r}: give one or more finite numbers > 0")
    if not isinstance(self.search_steps, int) or self.search_steps < 0:
      raise UserError(f"linear_probe.search_steps={self.search_steps!r}: must be an integer "
                      ">= 0")
    if not isinstance(self.max_iter, int) or self.max_iter <= 0:
      raise UserError(f"linear_probe.max_iter={self.max_iter!r}: must be a positive integer")
    if not _positive(self.tol):
      raise UserError(f"linear_probe.tol={self.tol!r}: must be a finite number > 0")
    if self.c is not None and not _positive(self.c):
      raise UserError(f"linear_probe.c={self.c!r}: must be a finite number > 0, or None to "
                      "search it on the validation shots")


def _positive(x: object) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iter"))
def fit(x: jax.Array, labels: jax.Array, c: jax.Array, num_classes: int, max_iter: int,
        tol: float) -> Params:
  """(N, E) features, (N,) labels -> {"w": (K, E), "b": (K,)}, the L2 logistic regression of
  regularisation `c` (sklearn's, see the module docstring); one compiled program for every c."""
  x = jnp.asarray(x, jnp.float32)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  c = c / 2 if num_classes == 2 else c  # sklearn's binomial model, see the module docstring
  strength = 1.0 / (c * x.shape[0])

  def objective(params):
    logits = x @ params["w"].T + params["b"]
    return (optax.softmax_cross_entropy(logits, onehot).mean()
            + 0.5 * strength * jnp.sum(params["w"] ** 2))

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                   value_fn=objective)
    return optax.apply_updates(params, updates), state

  def going(carry):
    _, state = carry
    count, grad = otu.tree_get(state, "count"), otu.tree_get(state, "grad")
    largest = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree.leaves(grad)]))
    return (count == 0) | ((count < max_iter) & (largest > tol))

  start = {"w": jnp.zeros((num_classes, x.shape[1]), jnp.float32),
           "b": jnp.zeros((num_classes,), jnp.float32)}
  params, _ = jax.lax.while_loop(going, step, (start, solver.init(start)))
  return params


def bisect(score: Callable[[float], float], grid: tuple[float, ...], steps: int) -> float:
  """The official C search over `score(C)` (validation accuracy): the grid's peak, then `steps`
  log-space bisection steps between 0.1 and 10 times it; the choice of the last step."""
  scores = [score(c) for c in grid]
  choice = grid[int(np.argmax(scores))]
  left, right = 0.1 * choice, 10.0 * choice
  for _ in range(steps):
    middle = 10.0 ** (0.5 * (math.log10(left) + math.log10(right)))
    if score(left) < score(right):
      choice, left = right, middle
    else:
      choice, right = left, middle
  return choice


def search_c(shots: np.ndarray, shot_labels: np.ndarray, val: np.ndarray, val_labels: np.ndarray,
             num_classes: int, config: Config) -> float:
  """C of the probe fit on the shots that scores best on the validation shots (`bisect`)."""
  @functools.cache
  def score(c: float) -> float:
    params = fit(shots, shot_labels, jnp.float32(c), num_classes, config.max_iter, config.tol)
    return feature_cache.accuracy(logits(params, val, config), val_labels)
  return bisect(score, config.grid, config.search_steps)


def init(task: feature_cache.Task, config: Config) -> Params:
  """The search for C on the validation shots (unless `config.c`), then the final fit."""
  c = config.c
  if c is None:
    if not len(task.val):
      raise UserError("linear_probe searches C on the validation shots and this task has none: "
                      "set --config.linear_probe.c (e.g. 1.0)")
    c = search_c(task.shots, task.shot_labels, task.val, task.val_labels, task.num_classes,
                 config)
  params = fit(task.shots, task.shot_labels, jnp.float32(c), task.num_classes, config.max_iter,
               config.tol)
  return {**params, feature_cache.FROZEN: {"c": jnp.asarray(c, jnp.float32)}}


def logits(params: Params, x: jax.Array, config: Config) -> jax.Array:
  del config
  return x @ params["w"].T + params["b"]


train_and_evaluate = feature_cache.run
load_adapter = feature_cache.load_adapter
logits_fn = feature_cache.logits_fn
