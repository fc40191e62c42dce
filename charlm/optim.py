"""Optimisers, gradient clipping and learning-rate schedules for training.

Design:

* Parameters are a dict ``name -> np.ndarray`` (float32 or float64, C-contiguous)
  that an optimiser updates **in place**, so the model sees the new weights
  without any copying. Every optimiser keeps its per-parameter state (momentum,
  moment estimates, accumulators) in arrays of the parameter's own dtype and
  shape. Adam and RMSProp do their arithmetic in one fused kernel pass per
  parameter (``charlm._kernels``); SGD and Adagrad use in-place ufuncs
  (``out=``) on one preallocated scratch array per parameter. Either way
  ``step()`` allocates nothing parameter-sized, which matters when it runs
  once per chunk.

* The learning rate is a plain attribute (``optimizer.lr``) that the trainer sets
  before each step from a :class:`Schedule`. The schedule is a pure function of
  the step index, so a resumed run reproduces the learning rates exactly
  without saving any schedule state beyond its parameters (``to_dict``).

* Weight decay, one policy per optimiser, each the one PyTorch uses:
  Adam decays **decoupled** (AdamW: ``p -= lr * weight_decay * p`` next to the
  Adam step, so the decay is not rescaled by the adaptive denominator); SGD,
  RMSProp and Adagrad add ``weight_decay * p`` to the gradient (classic L2).
  The gradients passed to ``step()`` are never modified.

* Checkpoints: ``state_tensors()`` (arrays, safetensors-ready keys such as
  ``"adam.m/weight_hh_l0"``) and ``state_meta()`` (flat JSON scalars: name,
  step_count, lr and the hyper-parameters). ``load_state`` validates everything
  before changing anything and restores the saved hyper-parameters too, so the
  checkpoint is the single truth for an exact continuation:
  ``make_optimizer(meta["name"], params, meta["lr"]).load_state(tensors, meta)``
  restores an optimiser completely.

* Clipping: ``clip_by_global_norm`` returns the norm before clipping. A
  non-finite norm (a NaN or inf anywhere in the gradients) is returned as is and
  the gradients are left untouched: scaling by ``max_norm / inf`` would turn
  the update into zeros or NaNs, so the caller should skip that step instead.
  ``step()`` itself does not check for NaN (that would cost a pass per step).
"""

from dataclasses import asdict, dataclass, fields
import math

import numpy as np

from . import _kernels as K
from .errors import ModelFileError, UsageError

OPTIMIZERS = ("adam", "rmsprop", "sgd", "adagrad")
SCHEDULES = ("constant", "cosine", "step", "linear")
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# -- value checks --------------------------------------------------------------

def _number(name, value, low, high, low_open=False, high_open=False, error=UsageError):
    """A finite real within [low, high] (ends open on request), as a Python float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise error(f"{name} must be a number, got {value!r}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if not math.isfinite(value) or too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise error(f"{name} must be in {interval}, got {value!r}")
    return value


def _integer(name, value, low, error=UsageError):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise error(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise error(f"{name} must be at least {low}, got {value}")
    return int(value)


def _check_params(params):
    if not isinstance(params, dict) or not params:
        raise UsageError("params must be a non-empty dict of name -> numpy array")
    for name, p in params.items():
        if not isinstance(name, str) or not name:
            raise UsageError(f"parameter names must be non-empty strings, got {name!r}")
        if not isinstance(p, np.ndarray) or p.dtype not in FLOAT_DTYPES:
            raise UsageError(f"parameter {name} must be a float32 or float64 numpy array")
        if not (p.flags.c_contiguous and p.flags.writeable):
            raise UsageError(f"parameter {name} must be a writeable C-contiguous array")


# -- optimisers ----------------------------------------------------------------

class Optimizer:
    """Base class: parameters, learning rate, step counter, state and checkpoints.

    Subclasses declare ``name``, ``SLOTS`` (per-parameter state arrays),
    ``NONNEGATIVE_SLOTS`` (running squares, which must stay >= 0), ``DEFAULTS``
    (hyper-parameters), and implement ``_check_options`` and ``_update``.
    """

    name = None
    SLOTS = ()
    NONNEGATIVE_SLOTS = ()
    DEFAULTS = {}
    USES_SCRATCH = True     # False for the optimisers whose update is one fused kernel

    def __init__(self, params, lr, **options):
        _check_params(params)
        self.params = params
        self.lr = lr
        self.step_count = 0
        unknown = sorted(k for k, v in options.items() if k not in self.DEFAULTS and v is not None)
        if unknown:
            raise UsageError(f"unknown option(s) for {self.name}: {', '.join(unknown)}; "
                             f"known: {', '.join(self.DEFAULTS)}")
        # None means "not given": lets callers pass every CLI option through.
        chosen = {k: v for k, v in options.items() if v is not None}
        self.hyper = self._check_options({**self.DEFAULTS, **chosen})
        # on cache lines, as the parameters (K.aligned_zeros)
        self._state = {slot: {k: K.aligned_zeros(p.shape, p.dtype) for k, p in params.items()}
                       for slot in self.SLOTS}
        self._scratch = ({k: K.aligned_empty(p.shape, p.dtype) for k, p in params.items()}
                         if self.USES_SCRATCH else dict.fromkeys(params))
        self._l2 = None   # g + weight_decay * p, allocated once if ever needed

    # The learning rate changes every step (schedules), so it is validated on set.
    @property
    def lr(self):
        return self._lr

    @lr.setter
    def lr(self, value):
        self._lr = _number("learning rate", value, 0.0, math.inf, high_open=True)

    def _check_options(self, options):
        raise NotImplementedError

    # -- stepping --------------------------------------------------------------

    def step(self, grads):
        """One update of every parameter, in place, from `grads` (same keys,
        shapes and dtypes as the parameters; not modified)."""
        self._check_grads(grads)
        self.step_count += 1
        for name, p in self.params.items():
            self._update(name, p, grads[name], self._scratch[name])

    def _update(self, name, p, g, scratch):
        raise NotImplementedError

    def _check_grads(self, grads):
        # A mismatch here is a programming error, not a user mistake.
        if not isinstance(grads, dict) or grads.keys() != self.params.keys():
            raise ValueError("grads must have exactly the parameters' names")
        for name, p in self.params.items():
            g = grads[name]
            if not isinstance(g, np.ndarray) or g.shape != p.shape or g.dtype != p.dtype:
                raise ValueError(f"gradient {name} must be a {p.dtype} array of shape {p.shape}")

    def _l2_gradient(self, name, p, g):
        """g + weight_decay * p in a buffer of its own, or g itself without decay.
        (The buffer is made on first use: load_state may switch decay on.)"""
        wd = self.hyper["weight_decay"]
        if wd == 0.0:
            return g
        if self._l2 is None:
            self._l2 = {k: np.empty_like(q) for k, q in self.params.items()}
        out = self._l2[name]
        np.multiply(p, wd, out=out)
        out += g
        return out

    # -- checkpoints -----------------------------------------------------------

    def _key(self, slot, param_name):
        return f"{self.name}.{slot}/{param_name}"

    def state_tensors(self):
        """Copies of the per-parameter state, keyed "<optimiser>.<slot>/<parameter>"."""
        return {self._key(slot, name): array.copy()
                for slot, arrays in self._state.items() for name, array in arrays.items()}

    def state_meta(self):
        """Flat JSON-able scalars: name, step_count, lr and the hyper-parameters."""
        return {"name": self.name, "step_count": self.step_count, "lr": self.lr,
                **self._hyper_to_meta()}

    def _hyper_to_meta(self):
        return dict(self.hyper)

    def _hyper_from_meta(self, meta):
        return {k: meta[k] for k in self.DEFAULTS}

    def load_state(self, tensors, meta):
        """Restore from state_tensors()/state_meta(). Everything is checked
        before anything changes; a mismatch raises ModelFileError."""
        step_count, lr, hyper = self._check_meta(meta)
        self._check_tensors(tensors)
        for slot, arrays in self._state.items():
            for name, array in arrays.items():
                np.copyto(array, tensors[self._key(slot, name)])
        self.step_count, self.lr, self.hyper = step_count, lr, hyper

    def _check_meta(self, meta):
        if not isinstance(meta, dict):
            raise ModelFileError("optimiser state metadata must be a JSON object")
        if "name" not in meta:
            raise ModelFileError("checkpoint has no optimiser state (no optimiser name)")
        if meta["name"] != self.name:
            raise ModelFileError(f"checkpoint holds optimiser state for {meta['name']!r}, "
                                 f"not {self.name!r}")
        expected = {"name", "step_count", "lr"} | set(self._hyper_to_meta())
        if set(meta) != expected:
            raise ModelFileError(f"{self.name} state metadata must have exactly the keys "
                                 f"{', '.join(sorted(expected))}")
        step_count = _integer("optimiser step_count", meta["step_count"], 0, error=ModelFileError)
        lr = _number("optimiser lr", meta["lr"], 0.0, math.inf, high_open=True,
                     error=ModelFileError)
        try:
            hyper = self._check_options(self._hyper_from_meta(meta))
        except UsageError as e:
            raise ModelFileError(f"bad {self.name} hyper-parameter in checkpoint: {e}") from None
        return step_count, lr, hyper

    def _check_tensors(self, tensors):
        if not isinstance(tensors, dict):
            raise ModelFileError("optimiser state tensors must be a dict")
        expected = {self._key(slot, name) for slot in self.SLOTS for name in self.params}
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ModelFileError(f"{self.name} state tensors do not match the parameters: "
                                 f"missing {missing[:3]}, unexpected {extra[:3]}")
        for slot in self.SLOTS:
            for name, p in self.params.items():
                key, t = self._key(slot, name), tensors[self._key(slot, name)]
                if not isinstance(t, np.ndarray) or t.shape != p.shape or t.dtype != p.dtype:
                    raise ModelFileError(f"{key} must be a {p.dtype} array of shape {p.shape}")
                if not np.isfinite(t).all():
                    raise ModelFileError(f"{key} holds NaN or infinite values")
                if slot in self.NONNEGATIVE_SLOTS and (t < 0).any():
                    raise ModelFileError(f"{key} holds negative running squares")


class SGD(Optimizer):
    """Stochastic gradient descent with (heavy-ball or Nesterov) momentum:
    v = momentum * v + g;  p -= lr * v   (Nesterov: p -= lr * (g + momentum * v)).
    Weight decay is L2: g += weight_decay * p."""

    name = "sgd"
    SLOTS = ("velocity",)
    DEFAULTS = {"momentum": 0.9, "nesterov": False, "weight_decay": 0.0}

    def _check_options(self, o):
        momentum = _number("momentum", o["momentum"], 0.0, 1.0, high_open=True)
        if not isinstance(o["nesterov"], (bool, np.bool_)):
            raise UsageError(f"nesterov must be true or false, got {o['nesterov']!r}")
        if o["nesterov"] and momentum == 0.0:
            raise UsageError("nesterov momentum needs momentum > 0")
        return {"momentum": momentum, "nesterov": bool(o["nesterov"]),
                "weight_decay": _number("weight_decay", o["weight_decay"], 0.0, math.inf,
                                        high_open=True)}

    def _update(self, name, p, g, scratch):
        mu, lr = self.hyper["momentum"], self.lr
        v = self._state["velocity"][name]
        g = self._l2_gradient(name, p, g)
        v *= mu
        v += g
        if self.hyper["nesterov"]:
            # p -= lr * g + (lr * mu) * v, in two passes through the scratch.
            np.multiply(g, lr, out=scratch)
            p -= scratch
            np.multiply(v, lr * mu, out=scratch)
        else:
            np.multiply(v, lr, out=scratch)
        p -= scratch


class RMSProp(Optimizer):
    """RMSProp (Tieleman & Hinton):
    E = alpha * E + (1 - alpha) * g^2;  p -= lr * g / (sqrt(E) + eps).

    alpha defaults to 0.95, char-rnn's decay_rate (PyTorch uses 0.99);
    ``decay`` is accepted as another name for it. eps is added outside the
    square root, as in PyTorch. Weight decay is L2: g += weight_decay * p."""

    name = "rmsprop"
    USES_SCRATCH = False
    SLOTS = ("square_avg",)
    NONNEGATIVE_SLOTS = ("square_avg",)
    DEFAULTS = {"alpha": 0.95, "eps": 1e-8, "weight_decay": 0.0}

    def __init__(self, params, lr, decay=None, **options):
        if decay is not None:
            if options.get("alpha") is not None:
                raise UsageError("give rmsprop's alpha or decay, not both")
            options["alpha"] = decay
        super().__init__(params, lr, **options)

    def _check_options(self, o):
        return {"alpha": _number("rmsprop alpha", o["alpha"], 0.0, 1.0, high_open=True),
                "eps": _number("eps", o["eps"], 0.0, math.inf, low_open=True, high_open=True),
                "weight_decay": _number("weight_decay", o["weight_decay"], 0.0, math.inf,
                                        high_open=True)}

    def _update(self, name, p, g, scratch):
        alpha, eps = self.hyper["alpha"], self.hyper["eps"]
        E = self._state["square_avg"][name]
        g = self._l2_gradient(name, p, g)
        K.rmsprop_update(p.reshape(-1), g.reshape(-1), E.reshape(-1), alpha, eps, self.lr)


class Adagrad(Optimizer):
    """Adagrad (Duchi et al.): G += g^2;  p -= lr * g / (sqrt(G) + eps).
    eps defaults to 1e-10 as in PyTorch. Weight decay is L2: g += weight_decay * p."""

    name = "adagrad"
    SLOTS = ("sum_sq",)
    NONNEGATIVE_SLOTS = ("sum_sq",)
    DEFAULTS = {"eps": 1e-10, "weight_decay": 0.0}

    def _check_options(self, o):
        return {"eps": _number("eps", o["eps"], 0.0, math.inf, low_open=True, high_open=True),
                "weight_decay": _number("weight_decay", o["weight_decay"], 0.0, math.inf,
                                        high_open=True)}

    def _update(self, name, p, g, scratch):
        G = self._state["sum_sq"][name]
        g = self._l2_gradient(name, p, g)
        np.multiply(g, g, out=scratch)
        G += scratch
        np.sqrt(G, out=scratch)
        scratch += self.hyper["eps"]
        np.divide(g, scratch, out=scratch)
        scratch *= self.lr
        p -= scratch


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction, and decoupled weight decay (AdamW):
    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
    p -= lr * weight_decay * p;  p -= lr * m_hat / (sqrt(v_hat) + eps),
    with m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t). The bias corrections are
    float64 scalars folded into one step size and one denominator scale, so
    m_hat and v_hat are never materialised."""

    name = "adam"
    USES_SCRATCH = False
    SLOTS = ("m", "v")
    NONNEGATIVE_SLOTS = ("v",)
    DEFAULTS = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}

    def _check_options(self, o):
        betas = o["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise UsageError(f"adam betas must be a pair of numbers, got {betas!r}")
        return {"betas": tuple(_number(f"adam beta{i + 1}", b, 0.0, 1.0, high_open=True)
                               for i, b in enumerate(betas)),
                "eps": _number("eps", o["eps"], 0.0, math.inf, low_open=True, high_open=True),
                "weight_decay": _number("weight_decay", o["weight_decay"], 0.0, math.inf,
                                        high_open=True)}

    # The metadata stays flat scalars: betas are stored as beta1 and beta2.
    def _hyper_to_meta(self):
        meta = {k: v for k, v in self.hyper.items() if k != "betas"}
        meta["beta1"], meta["beta2"] = self.hyper["betas"]
        return meta

    def _hyper_from_meta(self, meta):
        return {"betas": (meta["beta1"], meta["beta2"]), "eps": meta["eps"],
                "weight_decay": meta["weight_decay"]}

    def step(self, grads):
        # The bias corrections depend only on t: compute them once per step.
        b1, b2 = self.hyper["betas"]
        t = self.step_count + 1
        self._step_size = self.lr / (1.0 - b1 ** t)
        self._inv_sqrt_bc2 = 1.0 / math.sqrt(1.0 - b2 ** t)
        super().step(grads)

    def _update(self, name, p, g, scratch):
        (b1, b2), eps, wd = self.hyper["betas"], self.hyper["eps"], self.hyper["weight_decay"]
        m, v = self._state["m"][name], self._state["v"][name]
        # sqrt(v_hat) + eps = sqrt(v) / sqrt(1 - b2^t) + eps; one fused pass (see _kernels)
        K.adam_update(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1),
                      b1, b2, eps, self._step_size, self._inv_sqrt_bc2, 1.0 - self.lr * wd)


_CLASSES = {cls.name: cls for cls in (Adam, RMSProp, SGD, Adagrad)}


def make_optimizer(name, params, lr, **options):
    """An optimiser by name, over `params` (dict name -> array, updated in place).

    Options (None means "use the default"):
      sgd:     momentum=0.9, nesterov=False, weight_decay=0 (L2)
      rmsprop: alpha=0.95 (alias decay), eps=1e-8, weight_decay=0 (L2)
      adam:    betas=(0.9, 0.999), eps=1e-8, weight_decay=0 (decoupled, AdamW)
      adagrad: eps=1e-10, weight_decay=0 (L2)
    """
    if name not in _CLASSES:
        raise UsageError(f"unknown optimiser {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    _number("learning rate", lr, 0.0, math.inf, low_open=True, high_open=True)
    return _CLASSES[name](params, lr, **options)


# -- gradient clipping ---------------------------------------------------------

def global_norm(grads):
    """sqrt(sum of squares) over every array in `grads` (a dict or an iterable).

    Accumulated in float64 (by a kernel, in one pass), so float32 gradients
    of 1e20 do not overflow to inf.
    """
    arrays = grads.values() if isinstance(grads, dict) else grads
    total = 0.0
    for g in arrays:
        flat = np.ascontiguousarray(g).reshape(-1)
        if flat.dtype in FLOAT_DTYPES:
            total += K.sum_of_squares(flat)
        else:
            total += float(np.einsum("i,i->", flat, flat, dtype=np.float64))
    return math.sqrt(total)


def clip_by_global_norm(grads, max_norm):
    """Scale every gradient in place by max_norm / norm when norm > max_norm,
    keeping the direction of the whole update. Returns (norm before, clipped).

    A non-finite norm is returned unchanged with clipped=False and the
    gradients untouched: the caller must skip that step (see module docstring).
    """
    max_norm = _number("max gradient norm", max_norm, 0.0, math.inf,
                       low_open=True, high_open=True)
    norm = global_norm(grads)
    if not math.isfinite(norm) or norm <= max_norm:
        return norm, False
    scale = max_norm / norm
    for g in grads.values():
        g *= scale
    return norm, True


def clip_by_value(grads, limit):
    """Clamp every element in place into [-limit, limit]; True if any changed.
    This changes the direction of the update (unlike clip_by_global_norm).
    NaNs pass through unchanged; use global_norm to detect them."""
    limit = _number("gradient clip value", limit, 0.0, math.inf, low_open=True, high_open=True)
    clipped = False
    for g in grads.values():
        # Two reductions avoid rewriting arrays that are already within bounds.
        if g.size and (g.max() > limit or g.min() < -limit):
            np.clip(g, -limit, limit, out=g)
            clipped = True
    return clipped


def clip_gradients(grads, clip_norm=0.0, clip_value=0.0):
    """The clipping policy of `charlm train` and `charlm task` (0 turns each
    off): first by global norm, then by value. Returns (the global norm before
    clipping, whether anything was clipped). A non-finite norm is returned as
    it is, for the caller to skip the step; value clipping is not tried then."""
    if clip_norm:
        norm, clipped = clip_by_global_norm(grads, clip_norm)
    else:
        norm, clipped = global_norm(grads), False
    if clip_value and math.isfinite(norm):
        clipped = clip_by_value(grads, clip_value) or clipped
    return norm, clipped


# -- learning-rate schedules -----------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """The learning rate as a pure function of the step index.

    ``lr_at(step)`` is the rate for the update with 0-based index `step` (the
    optimiser's step_count before that update). The first `warmup_steps`
    updates ramp linearly, base_lr * (step + 1) / warmup_steps, so the first
    update is never at rate 0. The decay then runs over s = step - warmup_steps:

      constant: base_lr
      cosine:   from base_lr down to min_lr along half a cosine, reaching
                min_lr at total_steps and staying there
      linear:   straight line from base_lr to min_lr at total_steps
      step:     base_lr * decay_rate ** (s // decay_every), never below min_lr
                (char-rnn's learning_rate_decay, counted in steps)

    where min_lr = min_lr_frac * base_lr. Arguments a kind does not use are
    kept (and saved) but ignored.
    """

    kind: str
    base_lr: float
    total_steps: int = None
    warmup_steps: int = 0
    decay_rate: float = 0.5
    decay_every: int = None
    min_lr_frac: float = 0.0

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.kind!r}; choose one of "
                             f"{', '.join(SCHEDULES)}")
        # Normalise numbers to Python types so to_dict is JSON-able and stable.
        checked = {
            "base_lr": _number("base learning rate", self.base_lr, 0.0, math.inf,
                               low_open=True, high_open=True),
            "warmup_steps": _integer("warmup_steps", self.warmup_steps, 0),
            "decay_rate": _number("decay_rate", self.decay_rate, 0.0, 1.0, low_open=True),
            "min_lr_frac": _number("min_lr_frac", self.min_lr_frac, 0.0, 1.0),
        }
        if self.total_steps is not None:
            checked["total_steps"] = _integer("total_steps", self.total_steps, 1)
        if self.decay_every is not None:
            checked["decay_every"] = _integer("decay_every", self.decay_every, 1)
        for field, value in checked.items():
            object.__setattr__(self, field, value)   # the dataclass is frozen
        if self.kind in ("cosine", "linear"):
            if self.total_steps is None:
                raise UsageError(f"the {self.kind} schedule needs total_steps")
            if self.warmup_steps >= self.total_steps:
                raise UsageError(f"warmup_steps ({self.warmup_steps}) must be less than "
                                 f"total_steps ({self.total_steps})")
        if self.kind == "step" and self.decay_every is None:
            raise UsageError("the step schedule needs decay_every")

    def lr_at(self, step):
        step = _integer("step", step, 0)
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        s = step - self.warmup_steps
        base, low = self.base_lr, self.min_lr_frac * self.base_lr
        if self.kind == "constant":
            return base
        if self.kind == "step":
            return max(base * self.decay_rate ** (s // self.decay_every), low)
        progress = min(s / (self.total_steps - self.warmup_steps), 1.0)
        if self.kind == "cosine":
            return low + (base - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return base + (low - base) * progress      # linear

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict):
            raise UsageError("schedule must be a JSON object")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise UsageError(f"unknown schedule keys: {', '.join(sorted(unknown))}")
        if "kind" not in d or "base_lr" not in d:
            raise UsageError("schedule needs kind and base_lr")
        return cls(**d)
