"""Loss balance across modality groups: step balance (PT-3) and dynamic adaptive balance (IT-3).

Every optimizer step holds one group of micro-batches per modality and ONE update; the weights
here multiply each modality group's mean token loss (see docs/recipe.md sections 3 and 4).

Step balance (fixed weights, computed once before joint training)::

    w_i = alpha * (1 / L_i*) / sum_j (1 / L_j*)          (alpha = 10, so sum_i w_i = alpha)

``L_i*`` is modality i's converged loss from a calibration run on a subset of that modality;
:class:`PlateauDetector` decides when such a run has converged, and
:func:`write_step_balance_file` / :func:`read_step_balance_file` store the result.

Dynamic adaptive balance (:class:`DynamicBalancer`), one update per validation segment t::

    Lhat      = (L - min_window) / (max_window - min_window + eps)   (window: last H segments)
    a[i]      = least-squares slope of Lhat against the segment index 0..H-1
    a_tilde   = M * a / sum_j |a_j|
    s[i]      = softmax(a_tilde)[i] * (-a_tilde[i])
    w[i]      = M * softmax(f * s)[i]
    w_ema[i]  = ema * w_ema[i] + (1 - ema) * w[i]          (ema = 0.9, w_ema starts at 1)

Pure Python (float64 ``math``) so results are deterministic and identical on every rank; torch is
only imported by :func:`all_reduce_mean_losses`. No megatron import.
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from typing import Any, Mapping, Optional, Sequence, Union

__all__ = [
    "DEFAULT_ALPHA",
    "STEP_BALANCE_FORMAT",
    "step_balance_weights",
    "PlateauDetector",
    "write_step_balance_file",
    "read_step_balance_file",
    "normalized_slopes",
    "adaptive_weights",
    "DynamicBalancer",
    "all_reduce_mean_losses",
]

DEFAULT_ALPHA = 10.0
STEP_BALANCE_FORMAT = "megatron-omni/step-balance"
STEP_BALANCE_VERSION = 1

# Modality names: identifiers such as "text", "image", "gen_audio" (the config's data.modalities).
_MODALITY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")

# Below this, sum_j |a_j| counts as zero: every window is flat and the slopes carry no signal.
_ZERO_SLOPE_SUM = 1e-12


# --------------------------------------------------------------------------------------------
# helpers


def _check_modality_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _MODALITY_RE.match(name):
        raise ValueError(f"{where}: invalid modality name {name!r} "
                         f"(expected an identifier like 'text', 'image', 'gen_audio')")
    return name


def _finite_float(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        # Accept numpy / torch scalars too (anything with __float__ that is not a container).
        if not hasattr(value, "__float__") or isinstance(value, (str, bytes)):
            raise ValueError(f"{what} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{what} must be finite, got {v!r}")
    return v


def _softmax(x: Sequence[float]) -> list[float]:
    m = max(x)
    e = [math.exp(v - m) for v in x]
    s = sum(e)
    return [v / s for v in e]


# --------------------------------------------------------------------------------------------
# step balance


def step_balance_weights(converged_losses: Mapping[str, float],
                         alpha: float = DEFAULT_ALPHA) -> dict[str, float]:
    """Step-balance weights ``w_i = alpha * (1/L_i*) / sum_j (1/L_j*)`` (so ``sum_i w_i = alpha``).

    ``converged_losses`` maps modality name -> converged loss ``L_i*`` (> 0, finite). The result
    keeps the input's key order. A modality with a lower converged loss gets a larger weight.
    """
    if not isinstance(converged_losses, Mapping) or not converged_losses:
        raise ValueError("step_balance_weights needs a non-empty {modality: converged_loss} dict")
    alpha = _finite_float(alpha, "alpha")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    inv = {}
    for name, loss in converged_losses.items():
        _check_modality_name(name, "step_balance_weights")
        v = _finite_float(loss, f"converged loss of {name!r}")
        if v <= 0:
            raise ValueError(f"converged loss of {name!r} must be > 0, got {v}")
        inv[name] = 1.0 / v
    total = sum(inv.values())
    return {name: alpha * x / total for name, x in inv.items()}


class PlateauDetector:
    """Decide when a (calibration) loss stream has converged, and report ``L*``.

    Rule: feed one loss per step with :meth:`update`. After step ``n`` let ``cur`` be the mean of
    the last ``window`` losses and ``prev`` the mean of the ``window`` losses before those. The
    stream counts as *flat at step n* when ``n >= max(min_steps, 2 * window)`` and::

        |prev - cur| <= rel_tol * |prev|

    i.e. the windowed mean moved (in either direction) by at most ``rel_tol`` relative to the
    previous window. It has *converged* once it has been flat at ``patience`` consecutive steps.
    Then ``converged_loss`` (``L*``) is the mean of the final window (the last ``window`` losses
    at detection) and the detector latches: later updates return True and change nothing.

    A loss that still falls (or rises) by more than ``rel_tol`` per window is never flagged; the
    caller bounds the calibration run with its own step budget. Non-finite losses raise.
    """

    def __init__(self, window: int = 50, rel_tol: float = 0.01, min_steps: int = 0,
                 patience: int = 1):
        if int(window) != window or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}")
        if not (isinstance(rel_tol, (int, float)) and math.isfinite(rel_tol) and rel_tol >= 0):
            raise ValueError(f"rel_tol must be a finite number >= 0, got {rel_tol!r}")
        if int(min_steps) != min_steps or min_steps < 0:
            raise ValueError(f"min_steps must be an integer >= 0, got {min_steps!r}")
        if int(patience) != patience or patience < 1:
            raise ValueError(f"patience must be a positive integer, got {patience!r}")
        self.window = int(window)
        self.rel_tol = float(rel_tol)
        self.min_steps = int(min_steps)
        self.patience = int(patience)
        self._recent: list[float] = []  # the last 2 * window losses
        self.num_steps = 0
        self._flat_streak = 0
        self._converged_loss: Optional[float] = None
        self.converged_step: Optional[int] = None

    @property
    def converged(self) -> bool:
        return self._converged_loss is not None

    @property
    def converged_loss(self) -> Optional[float]:
        """``L*``: mean of the final window at detection, or None before convergence."""
        return self._converged_loss

    def update(self, loss: float) -> bool:
        """Add one step's loss; return True once the stream has converged."""
        if self.converged:
            return True
        v = _finite_float(loss, f"loss at step {self.num_steps}")
        self.num_steps += 1
        self._recent.append(v)
        w = self.window
        if len(self._recent) > 2 * w:
            del self._recent[0]
        if self.num_steps < max(self.min_steps, 2 * w):
            return False
        prev = sum(self._recent[:w]) / w
        cur = sum(self._recent[w:]) / w
        if abs(prev - cur) <= self.rel_tol * abs(prev):
            self._flat_streak += 1
        else:
            self._flat_streak = 0
        if self._flat_streak >= self.patience:
            self._converged_loss = cur
            self.converged_step = self.num_steps
            return True
        return False


def write_step_balance_file(path: Union[str, os.PathLike], weights: Mapping[str, float],
                            converged_losses: Optional[Mapping[str, float]] = None,
                            meta: Optional[Mapping[str, Any]] = None) -> None:
    """Write the step-balance weights (and how they were obtained) as JSON.

    Layout::

        {"format": "megatron-omni/step-balance", "version": 1,
         "weights": {modality: w}, "converged_losses": {modality: L*}, "meta": {...}}

    ``meta`` is free-form JSON-serialisable provenance (alpha, subset sizes, steps, ...). The
    weights are validated like :func:`read_step_balance_file` does; the file is written atomically.
    """
    clean_w = _validate_weights(weights, f"write_step_balance_file({os.fspath(path)!r})")
    doc: dict[str, Any] = {"format": STEP_BALANCE_FORMAT, "version": STEP_BALANCE_VERSION,
                           "weights": clean_w}
    if converged_losses is not None:
        cl = {}
        for name, loss in converged_losses.items():
            _check_modality_name(name, "converged_losses")
            cl[name] = _finite_float(loss, f"converged loss of {name!r}")
        if set(cl) != set(clean_w):
            raise ValueError(f"converged_losses modalities {sorted(cl)} != weights modalities "
                             f"{sorted(clean_w)}")
        doc["converged_losses"] = cl
    doc["meta"] = dict(meta or {})
    text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _validate_weights(weights: Any, where: str) -> dict[str, float]:
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"{where}: 'weights' must be a non-empty {{modality: weight}} mapping, "
                         f"got {weights!r}")
    out = {}
    for name, value in weights.items():
        _check_modality_name(name, where)
        v = _finite_float(value, f"{where}: weight of {name!r}")
        if v <= 0:
            raise ValueError(f"{where}: weight of {name!r} must be > 0, got {v}")
        out[name] = v
    return out


def read_step_balance_file(path: Union[str, os.PathLike],
                           modalities: Optional[Sequence[str]] = None) -> dict[str, float]:
    """Read the weights written by :func:`write_step_balance_file`.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` (naming the file) for bad
    JSON, a wrong ``format``/``version``, missing/empty ``weights``, invalid modality names or
    non-positive / non-finite weights. With ``modalities`` given, the file must name exactly those
    modalities (the stage's ``data.modalities``); the result then follows that order.
    """
    path = os.fspath(path)
    where = f"step-balance file {path!r}"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where} does not exist")
    with open(path) as f:
        text = f.read()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(doc).__name__}")
    if doc.get("format") != STEP_BALANCE_FORMAT:
        raise ValueError(f"{where}: 'format' must be {STEP_BALANCE_FORMAT!r}, "
                         f"got {doc.get('format')!r}")
    if doc.get("version") != STEP_BALANCE_VERSION:
        raise ValueError(f"{where}: unsupported version {doc.get('version')!r} "
                         f"(this code reads {STEP_BALANCE_VERSION})")
    if "weights" not in doc:
        raise ValueError(f"{where} has no 'weights'")
    weights = _validate_weights(doc["weights"], where)
    if modalities is not None:
        want = list(modalities)
        missing = [m for m in want if m not in weights]
        extra = [m for m in weights if m not in want]
        if missing or extra:
            raise ValueError(f"{where}: modalities do not match the stage's {want}: "
                             f"missing {missing}, unexpected {extra}")
        weights = {m: weights[m] for m in want}
    return weights


# --------------------------------------------------------------------------------------------
# dynamic adaptive balance


def _slope(values: Sequence[float]) -> float:
    n = len(values)
    xbar = (n - 1) / 2.0
    ybar = sum(values) / n
    num = sum((i - xbar) * (y - ybar) for i, y in enumerate(values))
    den = sum((i - xbar) ** 2 for i in range(n))
    return num / den


def _normalized_slope(window: Sequence[float], eps: float) -> float:
    vals = [float(v) for v in window]
    if len(vals) < 2:
        raise ValueError(f"a slope needs a window of >= 2 losses, got {len(vals)}")
    lo, hi = min(vals), max(vals)
    return _slope([(v - lo) / (hi - lo + eps) for v in vals])


def normalized_slopes(windows: Union[Mapping[str, Sequence[float]], Sequence[Sequence[float]]],
                      eps: float = 1e-6) -> Union[dict[str, float], list[float]]:
    """Convergence rate per modality: least-squares slope of the min-max-normalised window.

    Each window (oldest first) is normalised ``Lhat = (L - min) / (max - min + eps)`` and fitted
    against the index 0..n-1. Returns a dict for a dict input, else a list. A flat window has
    slope 0, a falling loss a negative one; the normalisation makes the slope independent of the
    loss's scale and offset (up to eps).
    """
    if isinstance(windows, Mapping):
        return {k: _normalized_slope(v, eps) for k, v in windows.items()}
    return [_normalized_slope(v, eps) for v in windows]


def adaptive_weights(slopes: Union[Mapping[str, float], Sequence[float]], f: float
                     ) -> Union[dict[str, float], list[float], None]:
    """The pre-EMA dynamic weights ``w`` for the given slopes (sum = M).

    ``a_tilde = M * a / sum|a|``, ``s = softmax(a_tilde) * (-a_tilde)``, ``w = M * softmax(f*s)``.
    Returns None when ``sum_j |a_j|`` is (numerically) zero -- every window is flat and the
    slopes carry no information; callers keep their previous weights then. Returns a dict for a
    dict input, else a list.
    """
    keys = list(slopes.keys()) if isinstance(slopes, Mapping) else None
    a = [_finite_float(v, "slope") for v in (slopes.values() if keys is not None else slopes)]
    if not a:
        raise ValueError("adaptive_weights needs at least one slope")
    f = _finite_float(f, "scale factor f")
    m = len(a)
    total = sum(abs(v) for v in a)
    if total <= _ZERO_SLOPE_SUM:
        return None
    a_tilde = [m * v / total for v in a]
    p = _softmax(a_tilde)
    s = [pi * (-ai) for pi, ai in zip(p, a_tilde)]
    q = _softmax([f * si for si in s])
    w = [m * qi for qi in q]
    return dict(zip(keys, w)) if keys is not None else w


class DynamicBalancer:
    """Dynamic adaptive balance over validation segments (docs/recipe.md section 4).

    Call :meth:`update` once per validation segment with that segment's per-modality validation
    losses (already averaged over data-parallel ranks, see :func:`all_reduce_mean_losses`); use
    :meth:`loss_weights_for_step` (= :attr:`weights`, the EMA weights) for every training step
    until the next segment.

    Warm-up: while fewer than ``window`` (H) segments have been seen, the weights stay exactly 1
    and the EMA is not updated -- so the weights are 1 before the first segment and after
    segments 1..H-1 (the first H training intervals). The H-th segment fills the window and gives
    the first adaptive update; each later segment slides the window by one.

    Zero-slope guard: if every window is flat (``sum_j |a_j| == 0``) the weights are left
    unchanged (no EMA step) for that segment.
    """

    def __init__(self, modalities: Sequence[str], window: int = 5, scale: float = 1.0,
                 ema: float = 0.9, eps: float = 1e-6):
        mods = list(modalities)
        if not mods:
            raise ValueError("DynamicBalancer needs at least one modality")
        for m in mods:
            _check_modality_name(m, "DynamicBalancer")
        if len(set(mods)) != len(mods):
            raise ValueError(f"duplicate modalities in {mods}")
        if int(window) != window or window < 2:
            raise ValueError(f"window H must be an integer >= 2 (a slope needs 2 points), "
                             f"got {window!r}")
        scale = _finite_float(scale, "scale f")
        if scale < 0:
            raise ValueError(f"scale f must be >= 0, got {scale}")
        ema = _finite_float(ema, "ema")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        eps = _finite_float(eps, "eps")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.modalities = mods
        self.window = int(window)
        self.scale = scale
        self.ema = ema
        self.eps = eps
        self.num_segments = 0
        self._history: dict[str, list[float]] = {m: [] for m in mods}
        self._w_ema: dict[str, float] = {m: 1.0 for m in mods}
        self._w_last: Optional[dict[str, float]] = None

    # -- the update --------------------------------------------------------------------------

    def update(self, val_losses: Mapping[str, float]) -> dict[str, float]:
        """Add one validation segment's losses (one per modality); return the new EMA weights."""
        if not isinstance(val_losses, Mapping):
            raise ValueError(f"val_losses must be a {{modality: loss}} dict, got {val_losses!r}")
        missing = [m for m in self.modalities if m not in val_losses]
        extra = [m for m in val_losses if m not in self._history]
        if missing or extra:
            raise ValueError(f"validation losses must name exactly {self.modalities}: "
                             f"missing {missing}, unexpected {extra}")
        vals = {m: _finite_float(val_losses[m], f"validation loss of {m!r}")
                for m in self.modalities}
        for m, v in vals.items():
            h = self._history[m]
            h.append(v)
            if len(h) > self.window:
                del h[0]
        self.num_segments += 1
        if self.num_segments < self.window:
            return self.weights
        slopes = normalized_slopes({m: self._history[m] for m in self.modalities}, self.eps)
        w = adaptive_weights(slopes, self.scale)
        if w is None:  # every window flat: no information, keep the weights
            return self.weights
        self._w_last = w
        self._w_ema = {m: self.ema * self._w_ema[m] + (1.0 - self.ema) * w[m]
                       for m in self.modalities}
        return self.weights

    # -- views -------------------------------------------------------------------------------

    @property
    def weights(self) -> dict[str, float]:
        """The EMA weights ``w_ema`` (all 1 during warm-up), in ``modalities`` order."""
        return dict(self._w_ema)

    def loss_weights_for_step(self) -> dict[str, float]:
        """Weights that multiply each modality's loss for the current training step (w_ema)."""
        return self.weights

    @property
    def last_raw_weights(self) -> Optional[dict[str, float]]:
        """The pre-EMA weights ``w`` of the last adaptive update (None before the first)."""
        return None if self._w_last is None else dict(self._w_last)

    @property
    def in_warmup(self) -> bool:
        return self.num_segments < self.window

    # -- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (lists, dicts, floats, ints): safe for torch.save and JSON."""
        return {
            "modalities": list(self.modalities),
            "window": self.window,
            "scale": self.scale,
            "ema": self.ema,
            "eps": self.eps,
            "num_segments": self.num_segments,
            "history": {m: list(h) for m, h in self._history.items()},
            "w_ema": dict(self._w_ema),
            "w_last": None if self._w_last is None else dict(self._w_last),
        }

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore :meth:`state_dict` exactly.

        The modalities must match (as a set). With ``strict`` the hyper-parameters (window,
        scale, ema, eps) must match too; with ``strict=False`` this balancer keeps its own
        (e.g. a changed f on resume) and the history is trimmed to its window.
        """
        try:
            mods = list(state["modalities"])
            history = {m: [float(v) for v in state["history"][m]] for m in mods}
            w_ema = {m: float(state["w_ema"][m]) for m in mods}
            w_last = state.get("w_last")
            w_last = None if w_last is None else {m: float(w_last[m]) for m in mods}
            num_segments = int(state["num_segments"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"bad DynamicBalancer state: {e!r}") from None
        if set(mods) != set(self.modalities):
            raise ValueError(f"checkpoint balancer modalities {mods} != configured "
                             f"{self.modalities}")
        if strict:
            for key in ("window", "scale", "ema", "eps"):
                if key in state and state[key] != getattr(self, key):
                    raise ValueError(f"checkpoint balancer {key}={state[key]!r} != configured "
                                     f"{getattr(self, key)!r} (load with strict=False to keep "
                                     f"the configured value)")
        self._history = {m: history[m][-self.window:] for m in self.modalities}
        self._w_ema = {m: w_ema[m] for m in self.modalities}
        self._w_last = None if w_last is None else {m: w_last[m] for m in self.modalities}
        self.num_segments = num_segments


# --------------------------------------------------------------------------------------------
# data-parallel averaging


def all_reduce_mean_losses(losses: Mapping[str, float], group=None) -> dict[str, float]:
    """Average per-modality validation losses over the ranks of ``group`` (data parallel).

    Identity (returning a float dict) when torch.distributed is not initialised. Modalities go
    into one float64 tensor in sorted-name order, so every rank builds the same layout; the
    tensor carries a checksum of the names, and a rank whose modality names differ raises.
    The result keeps the input's key order. Every rank ends with bit-identical values.
    """
    names = sorted(losses)
    for n in names:
        _check_modality_name(n, "all_reduce_mean_losses")
    vals = {n: float(losses[n]) for n in names}
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return {n: vals[n] for n in losses}
    world = dist.get_world_size(group)
    checksum = float(zlib.crc32("\0".join(names).encode()))
    from ..parallel.device import comm_device

    device = comm_device(group)
    t = torch.tensor([vals[n] for n in names] + [checksum], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    t = t.cpu().tolist()
    if t[-1] != checksum * world:
        raise RuntimeError(f"all_reduce_mean_losses: ranks disagree on the modality names "
                           f"(this rank has {names})")
    mean = {n: t[i] / world for i, n in enumerate(names)}
    return {n: mean[n] for n in losses}
