"""The ODELoRA optimizer: a ``torch.optim.Optimizer`` that integrates a LoRA factor flow with an
explicit Runge-Kutta method, one closure call (forward + backward) per stage.

A step is a short pipeline of named parts::

    fld  = _Field(start state, stage source)  stacked factors per bucket (PairStore) with cached frames;
                                               the closure, or .grad for the first stage
    res  = _integrate(fld)                     stages + accept/reject (integrators.attempt, shared with integrate)
    move = _move(y0, res)                      the RK step itself, or Adam moments of its mean velocity
                                               (None: no try accepted, or it overflows the parameters)
    _step_companion(fld)                       the AdamW companion (heads, biases), where the step is taken
    _commit(move) or _skip(res)                parameters written, frames cached, record kept; or the
                                               start state put back
"""

from __future__ import annotations

import numbers
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from ._warnings import warn
from .checkpoint import check_state_dict, frames_entry, like_params, restored, saved_frames
from .flows import Flow, get_flow
from .geometry import imbalance
from .integrators import Attempt, NonFiniteError, StepController, get_tableau, attempt
from .options import check_adam_options, check_count, check_flow_options, check_lr, companion_groups, companion_options, pair_groups
from .pairs import LoRAPair
from .preconditioners import Move, get_preconditioner
from .retractions import Factors, get_retraction, keep_where
from .store import PairStore, local

__all__ = ["ODELoRA", "NonFiniteError", "StepRecord", "StepTotals", "StepFailure"]

# The smallest adaptive step, as a fraction of lr: a try rejected there ends the step (skipped).
H_MIN = 1e-12


_EULER = get_tableau("euler")
NO_GRAD_HINT = ("If backward() ran, the optimizer's pairs are frozen or not in use: an adapter made active, or factors frozen, "
                "after the optimizer was built (build it again for the pairs now trained)")


class StepFailure(RuntimeError):
    """Steps were skipped ``max_skipped_steps`` times in a row (non-finite values, or no step
    size met the tolerance); the message names the pairs and what to try."""


@dataclass
class StepRecord:
    """Statistics of one ``step()``: gradient evaluations, whether it was accepted, rejected
    attempts (error control or non-finite stages), the step h taken (first group), the integration
    time t, the imbalance of the factors at the start of the step (``geometry.imbalance``, max
    over pairs), and the loss of the first closure call."""

    nfe: int = 0
    accepted: bool = False
    rejected: int = 0
    nonfinite: int = 0
    h: float = 0.0
    t: float = 0.0
    imbalance: float | None = None
    loss: float | None = None


@dataclass
class StepTotals:
    """Running totals over an optimizer's life (``ODELoRA.stats``): ``step()`` calls, gradient
    evaluations, accepted steps, rejected tries (error control or non-finite stages), tries
    rejected at a non-finite value, and skipped steps (no try accepted)."""

    steps: int = 0
    nfe: int = 0
    accepted: int = 0
    rejected: int = 0
    nonfinite: int = 0

    @property
    def skipped(self) -> int:
        """Steps with no accepted try, which left the parameters as they were."""
        return self.steps - self.accepted

    def __repr__(self) -> str:
        return (f"StepTotals(steps={self.steps}, skipped={self.skipped}, nfe={self.nfe}, accepted={self.accepted}, "
                f"rejected={self.rejected}, nonfinite={self.nonfinite})")

    @classmethod
    def from_dict(cls, totals: dict) -> "StepTotals":
        """From ``asdict`` of one, or an earlier version's dict (whose ``skipped`` is derived here)."""
        return cls(**{k: int(v) for k, v in totals.items() if k in cls.__dataclass_fields__})

    def add(self, record: StepRecord) -> None:
        """Count one step."""
        self.steps += 1
        self.nfe += record.nfe
        self.accepted += int(record.accepted)
        self.rejected += record.rejected
        self.nonfinite += record.nonfinite


@dataclass
class _Committed:
    """The last state a step wrote into the parameters, with its frames (the factors' thin SVDs),
    so the next step need not compute them again. ``versions``: the parameters'
    :meth:`PairStore.versions` after the write; None for a state that came from a checkpoint or a
    copy, which the next step first checks against the parameters' values."""

    y: list[Factors]
    versions: tuple | None


class _Field:
    """The vector field of one step: writes a state into the parameters, evaluates the gradient
    there (the closure, or ``.grad`` for the first stage) and returns the raw flow velocities.
    Raises :class:`NonFiniteError` naming the pairs at a NaN/inf loss, gradient or velocity."""

    def __init__(self, opt: "ODELoRA", y0: list[Factors], closure, first_from_grad: bool, first_loss=None):
        self.opt, self.closure, self.first_from_grad, self.y0 = opt, closure, first_from_grad, y0
        self.first_loss = first_loss  # of the gradients in .grad, where the loop gives it
        self.loss: Tensor | None = None
        self.idle: list[Tensor | None] = [None] * len(opt.store.buckets)  # per bucket, the pairs that sit out (PairStore.idle)
        self.units = opt._step_units()  # per bucket, the lr: the unit of its time step
        self.companion_grads: list | None = None
        self.calls = 0
        # Where only the product of a velocity matters, ask the flow for a tangent vector (or, failing
        # that, for factor velocities without the gauge term, which moves only the factorization).
        product_only = opt.retraction.velocity == "tangent" and not opt.preconditioner.per_coordinate
        self.tangent = opt.flow.tangent if product_only else None
        self.options = dict(opt.flow_options)
        if self.tangent is not None:
            self.options.pop("gauge", None)
        elif product_only and opt.flow.has_gauge:
            self.options.setdefault("gauge", False)

    def __call__(self, y: list[Factors]) -> list:
        opt, store = self.opt, self.opt.store
        first = self.calls == 0
        self.calls += 1
        if y is not self.y0:  # a later stage: the pairs that sit out it hold as they were
            store.unpack([x if f is None else keep_where(f, x0, x) for f, x0, x in zip(self.idle, self.y0, y)])
        loss = self.first_loss if first else None
        if not (first and self.first_from_grad):  # every closure call starts from no gradient, the companion's too
            store.clear_grads()
            if opt._companion is not None:
                for p in opt._companion_params():
                    p.grad = None
            with torch.enable_grad():
                loss = _checked_loss(self.closure())
            if not store.has_grads():
                raise RuntimeError(
                    "the closure left no gradient on the LoRA pairs: it must zero the gradients, compute the loss, "
                    f"call loss.backward() and return the loss. {NO_GRAD_HINT}"
                )
        if first:
            self.loss = loss
            self.idle, half = store.idle()
            if half:
                warn(f"LoRA pair(s) {_short(half)} with one factor frozen or without gradient sit out the step: ODELoRA "
                     "moves a pair's factors together. To train one factor alone, build the optimizer again with "
                     "create_odelora_optimizer (it gives such factors to the AdamW companion), or leave the pair "
                     "out and pass its trainable factor as companion=", RuntimeWarning)
            if opt._companion is not None:
                self.companion_grads = [None if p.grad is None else p.grad.clone() for p in opt._companion_params()]
        grads = self._grads()
        if first:
            opt._check_replicas(y, grads)
        v = [self._velocity(x, gB, gA) for x, (gB, gA) in zip(y, grads)]
        total = sum(t.sum() for k in v for t in k)
        # inf * 0 is NaN: a non-finite loss or companion gradient poisons the sum too (each rank
        # tests its own shard of a sharded companion gradient; the ranks then agree)
        also = [] if loss is None else [torch.as_tensor(loss).detach()]
        if first and self.companion_grads:
            also += [local(g) for g in self.companion_grads if g is not None]
        if also:
            total = total + sum(x.to(total).sum() for x in also) * 0
        ok = torch.isfinite(total)  # one sync: NaN/inf anywhere makes the sum so
        if not bool(opt._agree_all(ok)):
            raise NonFiniteError(self._describe(loss, grads, v) if not bool(ok) else "a non-finite loss or gradient on another rank")
        return v

    def taking_part(self) -> Tensor | None:
        """Per pair, in the store's order, whether it takes part in the step; None where all do."""
        if all(f is None for f in self.idle):
            return None
        return torch.cat([torch.ones(len(b.Bs), dtype=torch.bool, device=b.scale.device) if f is None else ~f
                          for f, b in zip(self.idle, self.opt.store.buckets)])

    def _grads(self) -> list[tuple[Tensor, Tensor]]:
        """The stacked gradients, zero for the pairs that sit out the step: no stage moves them."""
        grads = self.opt.store.grads()
        if all(f is None for f in self.idle):
            return grads
        off = lambda f, g: g if f is None else torch.where(f.view(-1, 1, 1), 0.0, g)
        return [(off(f, gB), off(f, gA)) for f, (gB, gA) in zip(self.idle, grads)]

    def _velocity(self, x: Factors, gB: Tensor, gA: Tensor):
        flow = self.opt.flow
        if self.tangent is not None:
            return self.tangent(x.B, x.A, gB, gA, scale=x.scale, frame=x.ensure_frame(), **self.options)
        extra = {"frame": x.ensure_frame()} if flow.uses_frame else {}
        return flow(x.B, x.A, gB, gA, scale=x.scale, **extra, **self.options)

    def _describe(self, loss, grads, v) -> str:
        """What was not finite, from what this rank holds: only the ranks that saw it get here, so
        nothing here may communicate (gathering a sharded gradient again left the others waiting)."""
        if loss is not None and not bool(torch.isfinite(torch.as_tensor(loss)).all()):
            return f"the loss is {float(torch.as_tensor(loss).detach().sum())}"
        store = self.opt.store
        bad_g = store.names_where([~(torch.isfinite(gB).flatten(1).all(1) & torch.isfinite(gA).flatten(1).all(1)) for gB, gA in grads])
        if bad_g:
            return f"non-finite gradient in {_short(bad_g)}"
        names = self.opt._companion_names
        bad_c = [names[i] or f"companion parameter {i} {tuple(g.shape)}" for i, g in enumerate(self.companion_grads or [])
                 if g is not None and not bool(torch.isfinite(local(g)).all())]
        if bad_c:
            return f"non-finite gradient of {_short(bad_c)}"
        bad_v = store.names_where([torch.stack([~torch.isfinite(t).flatten(1).all(1) for t in k]).any(0) for k in v])
        return f"non-finite velocity in {_short(bad_v)}"


def _checked_loss(loss):
    """A closure's value: None, or the loss as a real number (Python or NumPy) or one-element tensor."""
    if loss is None or (isinstance(loss, numbers.Real) and not isinstance(loss, bool)):
        return loss
    if isinstance(loss, Tensor) and loss.numel() == 1 and (loss.is_floating_point() or (not loss.is_complex() and loss.dtype != torch.bool)):
        return loss
    what = f"a {str(loss.dtype).replace('torch.', '')} tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else f"a {type(loss).__name__}"
    raise TypeError(f"the closure returned {what}: it must return the loss (a number or a one-element tensor) or None")


def _short(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


class ODELoRA(torch.optim.Optimizer):
    """Train LoRA pairs by integrating a factor flow (default: ODELoRA's balanced projected flow).

    Args:
        params: LoRA pairs (:class:`~odelora.LoRAPair`, ``(B, A[, scale])`` tuples or dicts with
            ``B``, ``A``, ``scale``), or param groups ``{"pairs": [...], "lr": ...}``. For a PEFT
            model use :func:`odelora.integrations.peft.create_odelora_optimizer`.
        lr: the time step h. With the scaled and balanced flows it is a full fine-tuning learning
            rate: one Euler step moves ``scale * B @ A`` by ``-lr * P(G)`` (balanced; scaled:
            ``-lr * (PU G + G PV)``). For adaptive methods
            (``bs32``, ``dopri5``) it is the largest step; the controller shrinks it as needed.
        method: ``"euler"``, ``"heun"``, ``"midpoint"``, ``"rk4"``, ``"bs32"`` or ``"dopri5"``.
            A method with s stages calls the closure s times per step (on the same batch); layers
            that draw random numbers (dropout) draw new ones at each call unless the closure
            restores the random state (``ODELoRATrainer`` does).
        flow: ``"balanced"`` (ODELoRA), ``"scaled"``, ``"gradient"`` (plain LoRA), or a
            :class:`~odelora.flows.Flow` / callable with the flow signature.
        retraction: how factors move (``odelora.retractions``): ``"truncate"`` (steps on the
            rank-r matrices, balanced factors; the default for ``balanced``), ``"split"`` (the
            same steps with the cheaper projector-splitting retraction), ``"balance"``
            (factor-space steps, then rebalancing of the result; like ``"none"``, too stiff near
            ``B = 0`` for ``bs32`` and ``dopri5``) or ``"none"`` (factor-space steps; the default
            for ``gradient``, and for ``scaled`` with fixed-step methods: scaled GD; ``scaled``
            with ``bs32`` or ``dopri5`` defaults to ``"truncate"``, see ``odelora.flows.Flow``).
        rtol, atol: error control of adaptive methods (``rtol`` is raised to the unit roundoff of
            the parameters' dtype: stages of a bf16 model see bf16-rounded factors).
        max_rejects: a step is retried with a smaller h at most this many times (the first stage
            is reused); a non-finite value at a later stage also counts as a rejection. With 0 a
            rejected try skips the step, and h shrinks from step to step instead: the controller
            reads consecutive skipped steps as it reads the tries of one step, so leaving
            ``B = 0`` (where the error does not fall with h and h is cut 25-fold) costs a few
            skipped steps.
        on_nonfinite: ``"warn"`` (default) or ``"raise"``. A NaN/inf loss or gradient at the
            start of a step skips the step: parameters and optimizer state stay as they were and
            ``stats.skipped`` counts it. With ``"raise"`` a :class:`NonFiniteError` follows
            every step skipped at a non-finite value: at the start, at a later stage in every
            try, or new factors that overflow the parameters.
        max_skipped_steps: after this many skipped steps in a row (non-finite values, or no
            step size meeting the tolerance) a :class:`StepFailure` names the pairs and what to
            try, whatever ``on_nonfinite`` says: training never freezes silently.
        preconditioner: ``None`` (plain ODE steps, SGD-like) or ``"adam"``: Adam moments of the
            step's mean velocity, with ``betas``, ``eps`` and decoupled ``weight_decay``, then the
            retraction. Fixed-step methods only.
        flow_options: extra keyword arguments for the flow (e.g. ``damping``).
        track_imbalance: record the imbalance of the factors at the start of each step.
        companion: other trainable parameters (heads, biases, DoRA magnitudes, ...), as tensors or
            ``(name, tensor)`` pairs (``head.named_parameters()``; messages then name them), or param
            groups of them (``{"params": [...], "weight_decay": 0.0}``), moved by an
            AdamW with ``companion_lr`` and ``companion_kwargs`` once per accepted step, from the
            gradients at the start of the step (torch's fused AdamW unless ``companion_kwargs``
            names ``foreach`` or ``fused``, or the parameters are sharded or not floating point).
            Its groups appear in ``param_groups`` (with ``companion=True``), so LR schedulers
            reach them too (one that sets absolute rates needs one per group: ``OneCycleLR(opt,
            max_lr=[lr, companion_lr])``). A NaN/inf in their gradients skips the step as one in
            the pairs' does. As in torch's optimizers, a tensor without a gradient is not moved: a
            frozen one trains once it is unfrozen.
        sync_ranks: whether the processes of an initialized ``torch.distributed`` group step
            together (data parallel: DDP, FSDP2): non-finite values and adaptive step decisions
            are then agreed by an all-reduce of one scalar per stage. Default: whenever a process
            group is initialized; pass False for processes that train independently, never under
            DDP or FSDP2 (a rank that skips a step would leave the others waiting in backward).
            The first step warns if the ranks' factors or gradients differ.

    Factors may be sharded (FSDP2's ``fully_shard``, DTensor parameters): each rank gathers the
    small factors and their gradients, computes the same step and writes its own shard back.

    A closure may return None (non-finite detection then relies on the gradients, and ``step``
    returns None). After each ``step``, ``last_step`` is its :class:`StepRecord` and ``stats``
    the running totals.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        method: str = "euler",
        flow: str | Flow = "balanced",
        *,
        retraction: str | None = None,
        rtol: float = 1e-3,
        atol: float = 1e-6,
        max_rejects: int = 10,
        on_nonfinite: str = "warn",
        max_skipped_steps: int = 10,
        preconditioner: str | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        flow_options: dict | None = None,
        track_imbalance: bool = True,
        companion: Iterable[Tensor | tuple[str, Tensor] | dict] | None = None,
        companion_lr: float = 1e-3,
        companion_kwargs: dict | None = None,
        sync_ranks: bool | None = None,
    ):
        lr = check_lr(lr)
        companion_lr = check_lr(companion_lr, "companion_lr")
        if not isinstance(track_imbalance, bool):
            raise ValueError(f"track_imbalance must be True or False, got {track_imbalance!r}")
        self.tableau = get_tableau(method)
        self.flow = get_flow(flow)
        self.retraction = get_retraction(retraction or self.flow.default_retraction(self.tableau.adaptive))
        self.preconditioner = get_preconditioner(preconditioner)
        if on_nonfinite not in ("warn", "raise"):
            raise ValueError(f"on_nonfinite must be 'warn' or 'raise', got {on_nonfinite!r}")
        if not self.preconditioner.uses_step and self.tableau.adaptive:  # the error estimate is of the RK step
            raise ValueError(f"preconditioner={self.preconditioner.name!r} needs a fixed-step method (euler, heun, midpoint, rk4)")
        adam = check_adam_options(self.preconditioner, betas, eps, weight_decay)
        check_flow_options(self.flow, flow_options or {})
        self.controller = StepController(rtol=rtol, atol=atol, h_min=H_MIN, h_max=1.0)
        self._rtol = self.controller.rtol  # as asked; the controller's is raised to the factors' rounding
        self.max_rejects = check_count("max_rejects", max_rejects, 0)
        self.max_skipped_steps = check_count("max_skipped_steps", max_skipped_steps, 1)
        self.on_nonfinite = on_nonfinite
        self.flow_options = dict(flow_options or {})
        self.track_imbalance = track_imbalance
        if not (sync_ranks is None or isinstance(sync_ranks, bool)):
            raise ValueError(f"sync_ranks must be True, False or None (whenever torch.distributed is initialized), got {sync_ranks!r}")
        self.sync_ranks = sync_ranks
        defaults = dict(lr=float(lr), **adam, t=0.0)
        super().__init__(pair_groups(params), defaults)  # each group through add_param_group
        self._companion = None
        groups, self._companion_names = companion_groups(companion)
        companion = [p for g in groups for p in g["params"]]
        factors = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in factors for p in companion):
            raise ValueError("a companion parameter is also a factor of a LoRA pair: list each tensor once (pairs or companion)")
        _refuse_shared_memory(self.pairs, companion, self._companion_names)
        if companion:
            self._companion = torch.optim.AdamW(groups, lr=companion_lr, **companion_options(companion, companion_kwargs))
            for g in self._companion.param_groups:  # shared dicts: LR schedulers reach them too
                g["companion"] = True
                self.param_groups.append(g)
        self._stage_closure: Callable | None = None
        self._stage_loss = None
        self._rho = 1.0  # adaptive step as a fraction of each group's lr (1 for fixed steps)
        self._skips = 0  # consecutive skipped steps
        self._rejected_at: tuple[float, float] | None = None  # the last try of a step skipped at its error: (rho, error)
        self._replicas_checked = False  # whether ranks that step together were checked to be replicas
        self._last: _Committed | None = None
        self._store: PairStore | None = None
        self.stats = StepTotals()
        self.last_step = StepRecord()
        stiff = self.flow.default_retraction(True) != "none"  # the flows whose factor ODE is stiff near B = 0
        _warn_about_starts(self.store, stiff and self.tableau.adaptive and self.retraction.velocity == "factors")

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Read by torch's ``GradScaler.step`` (fp16 loss scaling): where True, it calls
        :meth:`step` with its scale and inf flag set on the optimizer instead of unscaling ``.grad``
        and skipping the step itself. True only where such a step is refused: multi-stage methods
        and a pending stage closure take gradients of backward calls the scaler never sees. With
        Euler the scaler unscales and skips as for any optimizer (accelerate tells a skipped step
        by the step not being called)."""
        return self.tableau.stages > 1 or self._stage_closure is not None

    # ------------------------------------------------------------------ pairs
    @property
    def store(self) -> PairStore:
        """The pairs packed by shape; rebuilt when param groups are added or loaded."""
        if self._store is None:
            self._store = PairStore(self.param_groups)
        return self._store

    def _follow_moves(self) -> None:
        """Factors moved to another dtype or device since the pairs were packed (``model.to(...)``
        after building the optimizer): pack them again, in the new compute dtype, and let the
        adaptive methods' tolerance follow their rounding (Adam moments follow at their next use)."""
        if self._store is not None and self._store.moved():
            self._store, self._last = None, None
            self._tolerance_floor()
        if self._companion is not None:
            self._follow_companion_moves()

    def _follow_companion_moves(self) -> None:
        """torch's AdamW keeps its moments in the dtype and on the device they were made in, and
        its fused kernel then refuses to step: move them with their parameters (the fused
        kernel's step count too)."""
        fused = any(g.get("fused") for g in self._companion.param_groups)
        for p in self._companion_params():
            st = self._companion.state.get(p, {})
            for k, v in st.items():
                if not torch.is_tensor(v):
                    continue
                if k != "step" and (v.dtype, v.device) != (p.dtype, p.device):
                    st[k] = v.to(device=p.device, dtype=p.dtype)
                elif k == "step" and fused and v.device != p.device:
                    st[k] = v.to(p.device)

    def _tolerance_floor(self) -> None:
        """Stages are evaluated at parameters rounded to their dtype: no rtol below that."""
        eps = [torch.finfo(p.dtype).eps for g in self.param_groups if not g.get("companion") for p in g["params"]]
        self.controller.rtol = max([self._rtol, *eps])

    @property
    def pairs(self) -> list[LoRAPair]:
        """The pairs, in the order given."""
        return PairStore.pairs(self.param_groups)

    def _companion_params(self) -> list[Tensor]:
        return [p for g in self._companion.param_groups for p in g["params"]]

    def set_stage_closure(self, closure: Callable[[], Any] | None, loss: Tensor | float | None = None) -> None:
        """For loops that backpropagate before calling ``step()`` (transformers' Trainer): the next
        ``step()`` without a closure takes its first stage from ``.grad`` and calls ``closure``
        for the remaining stages on the same batch. ``loss``: the loss whose gradients ``.grad``
        holds, recorded in ``last_step`` and checked for NaN/inf as a closure's would be."""
        self._stage_closure, self._stage_loss = closure, _checked_loss(loss)

    def add_param_group(self, param_group: dict) -> None:
        if param_group.get("companion"):
            raise ValueError("companion groups are made at construction: pass every trainable tensor that is not a LoRA "
                             "factor as companion=[...] when building ODELoRA, or give it an optimizer of its own")
        if "pairs" in param_group:
            known = sum(len(g["scales"]) for g in self.param_groups if not g.get("companion"))
            (param_group,) = pair_groups([param_group], start=known)
        if "scales" not in param_group or 2 * len(param_group["scales"]) != len(param_group["params"]):
            raise ValueError("ODELoRA param groups are built from pairs: pass {'pairs': [...], ...}")
        opts = {**self.defaults, **param_group}
        adam = check_adam_options(self.preconditioner, opts["betas"], opts["eps"], opts["weight_decay"])
        param_group.update({k: v for k, v in adam.items() if k in param_group})
        if hasattr(self, "_companion_names"):  # after construction, which checks once all groups are in
            companion = self._companion_params() if self._companion else []
            _refuse_shared_memory(PairStore.pairs([*self.param_groups, param_group]), companion, self._companion_names)
        super().add_param_group(param_group)
        self._tolerance_floor()
        self._store, self._last = None, None  # new buckets: pack from the parameters

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Advance every pair by one step; returns the loss of the first closure call.

        Without a closure the first stage is the gradients already in ``.grad``: enough for Euler;
        other methods need a closure, passed here or by :meth:`set_stage_closure`.
        """
        if "found_inf" in self.__dict__:  # under GradScaler.step: see _step_supports_amp_scaling
            self._refuse_grad_scaler()
        if closure is None and self._stage_closure is None and self._idle_probe():
            self._stage_loss = None  # taken, as a step takes it
            return None
        self._follow_moves()
        source = self._stage_source(closure)
        fld = _Field(self, self._start_state(), *source)
        with self._put_back_on_error(fld.y0):
            res = self._integrate(fld)
            move = self._move(fld, res)
            if move is not None:
                self._step_companion(fld)
        if self.tableau.adaptive:
            self._rho, self._rejected_at = res.h_next, None if move is not None else res.rejected_at
        if move is None:
            return self._skip(fld, res)
        self._commit(move, fld, res)
        return fld.loss

    def _refuse_grad_scaler(self) -> None:
        for key in ("grad_scale", "found_inf"):  # GradScaler.step deletes them only where the step returns
            self.__dict__.pop(key, None)
        self._stage_closure, self._stage_loss = None, None
        raise ValueError(
            f"GradScaler.step(optimizer) with method {self.tableau.name!r} ({self.tableau.stages} gradient(s) per step) or "
            "a stage closure: the gradients of closure calls come from a backward the scaler does not unscale. With fp16 "
            "loss scaling use method='euler' and scaler.step(optimizer) without a closure; for other methods train in "
            "bfloat16 (no scaler needed) or float32"
        )

    def _idle_probe(self) -> bool:
        """Whether this step has nothing to do at all: every group's lr (the companion's too) 0 and
        every trainable tensor's gradient there and zero, on every rank. It then does nothing,
        counts nothing and steps no companion: torch.distributed.checkpoint's
        ``get_optimizer_state_dict`` calls such a step to make a stateless optimizer build its
        state, and left a multi-stage method, which raised for want of a closure, with every lr 0.
        (Missing gradients still fail as in any other step: a forgotten backward.)"""
        if any(g["lr"] != 0 for g in self.param_groups):
            return False
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        zero = bool(params) and all(p.grad is not None and not bool(local(p.grad).any()) for p in params)
        if self._ranks() == 1:
            return zero
        return bool(self._agree_all(torch.tensor(zero, device=local(params[0]).device)))  # on the collectives' device

    @contextmanager
    def _put_back_on_error(self, y0: list[Factors]):
        """An error in the closure, the flow or the preconditioner leaves the parameters as the step found them."""
        try:
            yield
        except BaseException:
            self._restore(y0)
            raise

    def _integrate(self, fld: _Field) -> Attempt:
        """The stages and the accept/reject decision (:func:`integrators.attempt`, shared with
        ``integrate``). A non-finite first stage is a rejection no smaller step can help: it
        leaves the next adaptive step as it was. A step whose every try was non-finite shortens
        it by one ``shrink`` at most (not one per try: such a batch is bad whatever the step)."""
        rho = self._rho if self.tableau.adaptive else 1.0
        units = fld.units
        still = not any(units) and self.preconditioner.uses_step  # every lr 0 (a warm-up's first step)
        try:
            res = attempt(  # standing still needs only the loss: one evaluation
                fld, fld.y0, rho, _EULER if still else self.tableau, self.retraction, self.controller, unit=units,
                max_tries=self.max_rejects + 1, deciding=self._deciding(fld),
                combine=self.preconditioner.uses_step and not still, previous=None if still else self._rejected_at,
            )
        except NonFiniteError as exc:
            return Attempt(None, [], rho, rho, nfe=fld.calls, rejected=1, nonfinite=1, why=str(exc))
        if not res.accepted and res.nonfinite == res.rejected:
            res.h_next = max(res.h_next, rho * self.controller.shrink)
        if still and res.accepted:
            res.y = fld.y0  # not even refactored
        return res

    def _deciding(self, fld: _Field) -> Callable[[Tensor], Tensor]:
        """What the step size is decided on, from a try's error ratios (one per pair): the largest
        over ranks, so that they decide alike, of the pairs that take part in the step."""
        def deciding(ratios: Tensor) -> Tensor:
            ratios = self._agree_max(ratios) if self._ranks() > 1 else ratios
            part = fld.taking_part()
            if part is None:
                return ratios
            part = part.to(ratios.device)
            return ratios[part] if bool(part.any()) else ratios.new_zeros(1)
        return deciding

    def _move(self, fld: _Field, res: Attempt) -> Move | None:
        """The preconditioner's new factors from an accepted attempt, with the pairs that sit out
        the step as they were. None where no try was accepted, or where they would overflow the
        parameters (or hold a NaN): that try then counts as rejected at a non-finite value, and the
        next adaptive step is shorter."""
        if not res.accepted:
            return None
        move = self.preconditioner(fld.y0, res, self.tableau, self.retraction, self.store.buckets, self.param_groups, self.state)
        move = move.without(fld.idle, fld.y0, self.store.buckets).holding([u == 0 for u in fld.units], fld.y0)
        overflow = self._overflow(move.y)
        if overflow is None:
            return move
        res.accepted, res.why = False, f"the step overflows the {overflow} parameters"
        res.rejected, res.nonfinite = res.rejected + 1, res.nonfinite + 1
        res.h_next = max(self.controller.h_min, res.h * self.controller.shrink)
        return None

    def _step_units(self) -> list[float]:
        """Each bucket's lr (its group's, as an LR scheduler left it): the unit of its time step."""
        units = []
        for b in self.store.buckets:
            lr = self.param_groups[b.group]["lr"]
            try:
                units.append(check_lr(lr))
            except ValueError as err:
                raise ValueError(f"param group {b.group}: {err}") from None
        return units

    # ------------------------------------------------------------------ ranks
    def _ranks(self) -> int:
        """Processes that take this step together: the world size when ``sync_ranks`` (default:
        whenever torch.distributed is initialized; data-parallel training), else 1."""
        if self.sync_ranks is False or not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size()

    def _agree_all(self, flag: Tensor) -> Tensor:
        """True only if ``flag`` holds on every rank: a NaN seen by one rank skips the step on all."""
        if self._ranks() == 1:
            return flag
        f = flag.to(torch.float32).reshape(1)
        dist.all_reduce(f, op=dist.ReduceOp.MIN)
        return f[0] > 0

    def _check_replicas(self, y: list[Factors], grads: list[tuple[Tensor, Tensor]]) -> None:
        """Once, where ranks step together: warn if their factors or gradients differ (a model not
        wrapped in DDP or FSDP2 trains each rank on its own batch, and the ranks drift apart)."""
        if self._replicas_checked or self._ranks() == 1:
            return
        # A fingerprint of fixed size whatever the pairs (ranks may hold different ones): the
        # factors' and the gradients' sums and squared norms, and the element count.
        def sums(ts: list[Tensor]) -> list[Tensor]:
            flat = torch.cat([t.double().flatten() for t in ts])
            return [flat.sum(), flat.square().sum(), flat.new_tensor(float(flat.numel()))]

        fp = torch.stack(sums([t for x in y for t in (x.B, x.A)]) + sums([t for g in grads for t in g]))
        flag = fp.new_tensor([0.0 if bool(torch.isfinite(fp).all()) else 1.0])
        fp = fp.nan_to_num(0.0, 0.0, 0.0)
        both = torch.cat([fp, -fp, flag])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        if float(both[-1]):  # a non-finite value on some rank: this step is skipped; check at the next one
            return
        self._replicas_checked = True
        n = len(fp)
        hi, lo = both[:n], -both[n:2 * n]
        if bool(((hi - lo) > 1e-6 * torch.maximum(hi.abs(), lo.abs()) + 1e-30).any()):
            warn(f"the LoRA factors or their gradients differ between the {self._ranks()} processes at the first step, "
                 "which take their steps together (sync_ranks): wrap the model in DistributedDataParallel or FSDP2's "
                 "fully_shard, so that the processes stay replicas, or pass sync_ranks=False to ODELoRA for processes "
                 "that train independently", RuntimeWarning)

    def _agree_max(self, ratios: Tensor) -> Tensor:
        """The largest error ratios over ranks, so the step-size controller decides alike on all."""
        r = ratios.clone()
        dist.all_reduce(r, op=dist.ReduceOp.MAX)
        return r

    def _stage_source(self, closure):
        """The closure of the step's stages, whether the first stage is the gradients in ``.grad``,
        and the loss that those come from, if the loop said so (:meth:`set_stage_closure`)."""
        stage_closure, self._stage_closure = self._stage_closure, None
        stage_loss, self._stage_loss = self._stage_loss, None
        from_grad = closure is None and stage_closure is not None
        if from_grad:
            closure = stage_closure
        if closure is None and self.tableau.stages > 1:
            raise ValueError(
                f"method {self.tableau.name!r} evaluates the gradient {self.tableau.stages} times per step: pass a "
                "closure that zeroes gradients, computes the loss on the current batch, calls "
                "backward() and returns the loss (optimizer.step(closure)); under transformers' Trainer, use "
                "odelora.integrations.trainer.ODELoRATrainer, which passes one, or method='euler'"
            )
        if (closure is None or from_grad) and not self.store.has_grads():
            raise RuntimeError(f"no gradients on the LoRA pairs: call loss.backward() first or pass a closure. {NO_GRAD_HINT}")
        from_grad = closure is None or from_grad
        return closure, from_grad, stage_loss if from_grad else None

    def _start_state(self) -> list[Factors]:
        """The parameters as stacked factors; the last committed state (with its frames) when the
        parameters still hold what was written: same versions and storage (see
        :meth:`PairStore.versions`; in-place writes through ``.data`` are not seen)."""
        store = self.store
        if any(b.Bs[0].device.type == "meta" for b in store.buckets):
            raise RuntimeError("the LoRA factors are on the meta device, without values: materialize the model "
                               "(model.to_empty(device=...), then initialize the weights) before stepping")
        last = self._last
        if last is not None and all(b.exact for b in store.buckets):
            if last.versions is not None and last.versions == store.versions():
                return [Factors(x.B, x.A, x.scale, x.frame) for x in last.y]
            if last.versions is None:
                y = restored(last.y, store)
                if y is not None:
                    return y
        self._last = None
        return store.pack()

    def _overflow(self, y: list[Factors]) -> str | None:
        """The dtype of the parameters that the new factors would overflow (or that would take a
        NaN: a step too long for float32 factors too), if any; one host sync for all buckets."""
        # Factors stored as computed overflow only where a step adds to them: factor-space steps and
        # per-coordinate preconditioners. A retraction refactors a decomposition of the stepped
        # product, and one of a non-finite product fails as a rejected try.
        added = self.retraction.velocity == "factors" or self.preconditioner.per_coordinate
        checked, fits = [], []
        for b, x in zip(self.store.buckets, y):
            if b.exact and not added:
                continue
            checked.append(b)
            if b.exact:  # only inf or NaN (or sums of entries near the dtype's limit) fail
                fits.append(torch.isfinite(x.B.sum() + x.A.sum()))
            else:
                big = torch.finfo(b.Bs[0].dtype).max
                fits.append((x.B.abs().amax() <= big) & (x.A.abs().amax() <= big))  # False at NaN too
        if not fits or bool(torch.stack(fits).all()):
            return None
        bad = next(b for b, ok in zip(checked, fits) if not bool(ok))
        return str(bad.Bs[0].dtype).replace("torch.", "")

    def _step_companion(self, fld: _Field) -> None:
        """The companion's AdamW step, from the gradients at the start of the step; before anything
        else is written, so that an error in it leaves the step undone."""
        if self._companion is not None:
            for p, g in zip(self._companion_params(), fld.companion_grads):
                p.grad = g
            self._companion.step()

    def _commit(self, move: Move, fld: _Field, res: Attempt) -> None:
        store, y = self.store, [x.contiguous() for x in move.y]
        store.unpack(y)
        self._last = _Committed(y, store.versions())
        for p, entries in move.state.items():
            self.state[p].update(entries)
        self._skips = 0
        for g in self.param_groups:
            if not g.get("companion"):
                g["t"] += res.h * float(g["lr"])
        self._record(fld, res)

    def _restore(self, y0: list[Factors]) -> None:
        """Write the start state back into the parameters, keeping its frames where the parameters
        hold it exactly: the next step then computes as if this one never ran."""
        store = self.store
        store.unpack(y0)
        if all(b.exact for b in store.buckets):
            self._last = _Committed(y0, store.versions())

    def _skip(self, fld: _Field, res: Attempt):
        """Restore the parameters, count the skipped step, warn or raise."""
        self._restore(fld.y0)
        self._skips += 1
        self._record(fld, res)
        msg = f"ODELoRA skipped a step: {res.why or self._failure(fld, res)}; parameters and state are unchanged"
        if self._skips >= self.max_skipped_steps:
            raise StepFailure(
                f"{msg}. That is {self._skips} skipped steps in a row. Lower lr, check the data and the loss for "
                "NaN/inf, train in float32 rather than float16, or loosen rtol/atol for adaptive methods"
            )
        if (res.why is not None or res.nonfinite == res.rejected) and self.on_nonfinite == "raise":  # skipped at a non-finite value
            raise NonFiniteError(msg)
        warn(msg, RuntimeWarning)
        return fld.loss

    def _failure(self, fld: _Field, res: Attempt) -> str:
        """Why no try of a step was accepted."""
        tries = "the one try" if res.rejected == 1 else f"all {res.rejected} tries"
        if res.nonfinite == res.rejected:  # every try hit NaN/inf at a later stage
            return (f"a later stage was non-finite ({res.nonfinite_what or 'loss, gradient or velocity'}) in {tries}"
                    + (f", the step shrinking {1 / self.controller.shrink:g}-fold each time" if res.rejected > 1 else ""))
        why = (f"no step met rtol={self.controller.rtol}, atol={self.controller.atol} in {tries}"
               + (f", {res.nonfinite} of them non-finite at a later stage" if res.nonfinite else "")
               + " (the next step starts from the last step size tried)")
        if res.ratios is not None and res.ratios.numel():
            part = fld.taking_part()
            names = [n for b in self.store.buckets for n in b.names]
            names = names if part is None else [n for n, p in zip(names, part.tolist()) if p]
            worst = int(res.ratios.argmax())
            why += f" (largest error at {names[worst]}: {float(res.ratios[worst]):.3g} x tolerance)"
        if res.h <= self.controller.h_min:
            why += (f"; the step reached its floor, {self.controller.h_min:g} x lr: no error-controlled step fits these "
                    "velocities" + (" (factor-space steps: retraction='truncate' steps the product instead)"
                                    if self.retraction.velocity == "factors" else ""))
        return why

    def _record(self, fld: _Field, res: Attempt) -> None:
        """``last_step`` and the running ``stats`` after a step, taken or skipped."""
        nfe, accepted, rejected, nonfinite, h = res.nfe, res.accepted, res.rejected, res.nonfinite, res.h if res.accepted else 0.0
        g0 = next(g for g in self.param_groups if not g.get("companion"))
        imb = None
        if self.track_imbalance:
            imb = max(_start_imbalance(x) for x in fld.y0)
        loss = fld.loss
        self.last_step = StepRecord(
            nfe=nfe, accepted=accepted, rejected=rejected, nonfinite=nonfinite, h=h * float(g0["lr"]), t=float(g0["t"]), imbalance=imb,
            loss=None if loss is None else float(torch.as_tensor(loss).detach().sum()),
        )
        self.stats.add(self.last_step)

    # ------------------------------------------------------------------ state
    def __getstate__(self) -> dict:
        """Everything but torch's hooks (as torch's optimizers), a pending stage closure and the
        packed pairs (rebuilt from the param groups): ``copy.deepcopy`` and ``pickle`` of a model
        with its optimizer give one that steps as the original would."""
        skip = {"_stage_closure", "_stage_loss", "_store", "grad_scale", "found_inf"}  # (the last two: GradScaler's, for one call)
        return {k: v for k, v in self.__dict__.items() if k not in skip and not k.startswith("_optimizer_")}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._stage_closure, self._stage_loss, self._store = None, None, None
        self.__dict__.setdefault("_replicas_checked", False)
        self.__dict__.setdefault("_rejected_at", None)
        self.__dict__.setdefault("_companion_names", [None] * len(self._companion_params()) if self._companion else [])
        if isinstance(self.stats, dict):  # pickled by an earlier version
            self.stats = StepTotals.from_dict(self.stats)
        if self._last is not None:  # the copied frames, checked against the copied parameters at the next step
            self._last = _Committed(self._last.y, None)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        extra: dict[str, Any] = dict(rho=self._rho, skips=self._skips, rejected_at=self._rejected_at, stats=asdict(self.stats),
                                     last_step=asdict(self.last_step), config=self._config(), layout=self.store.layout())
        if self._last is not None:  # derived, but resuming must reproduce the same arithmetic
            extra.update(frames_entry(self._last.y))
        if self._companion is not None:
            extra["companion"] = self._companion.state_dict()
        sd["odelora"] = extra
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Checks that the state fits (:func:`checkpoint.check_state_dict`), torch's loading, then
        ODELoRA's own: Adam moments in the compute dtype, the adaptive step, the statistics, the
        cached frames and the companion's state."""
        state_dict = dict(state_dict)
        self._follow_moves()
        check_state_dict(state_dict, self.param_groups, self.store.layout(), self._config())
        extra = state_dict.pop("odelora")
        super().load_state_dict(state_dict)
        self._store = None
        self._reload_moments(state_dict)
        self._rho, self._skips = float(extra["rho"]), int(extra.get("skips", 0))
        at = extra.get("rejected_at")
        self._rejected_at = None if at is None else (float(at[0]), float(at[1]))
        self.stats = StepTotals.from_dict(extra["stats"])
        fields = StepRecord.__dataclass_fields__  # (checkpoints of earlier versions have no last step)
        self.last_step = StepRecord(**{k: v for k, v in extra.get("last_step", {}).items() if k in fields})
        y = saved_frames(extra, self.store)
        self._last = None if y is None else _Committed(y, None)  # checked against the parameters at the next step
        if self._companion is not None:
            if "companion" in extra:
                self._companion.load_state_dict(like_params(extra["companion"], self._companion_params()))
            self._share_companion_groups()

    def _reload_moments(self, state_dict: dict) -> None:
        """torch casts state to the parameters' dtype; Adam moments live in the compute dtype
        (float32 for half-precision factors): take them from the state dict itself."""
        saved = {id(p): pid for g, h in zip(self.param_groups, state_dict["param_groups"]) for p, pid in zip(g["params"], h["params"])}
        for b in self.store.buckets:
            for p in b.params:
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in self.state.get(p, {}):
                        value = state_dict["state"][saved[id(p)]][key]
                        self.state[p][key] = value.to(device=self.state[p][key].device, dtype=b.dtype, copy=True)

    def _share_companion_groups(self) -> None:
        """The companion's group dicts stand in ``param_groups`` themselves (LR schedulers reach
        them there); torch's loading replaced them with copies holding the saved values."""
        groups = iter(self._companion.param_groups)
        for i, g in enumerate(self.param_groups):
            if g.get("companion"):
                mine = next(groups)
                mine.update({k: v for k, v in g.items() if k != "params"})
                self.param_groups[i] = mine

    def _config(self) -> dict[str, str]:
        return dict(method=self.tableau.name, flow=self.flow.name, retraction=self.retraction.name, preconditioner=self.preconditioner.name)

    def __repr__(self) -> str:
        """The method, then each group with the options it acts on (Adam's only with the Adam
        preconditioner), its pairs counted; companion groups as torch's AdamW shows them."""
        lines = [f"ODELoRA ({', '.join(f'{k}={v}' for k, v in self._config().items())}"]
        unread = {"params", "names", "scales"} | ({"betas", "eps", "weight_decay"} - set(self.preconditioner.options))
        for i, g in enumerate(self.param_groups):
            companion = bool(g.get("companion"))
            head = "companion AdamW" if companion else f"{len(g['scales'])} pair(s): {_short(g['names'])}"
            lines.append(f"Parameter Group {i}, {head}")
            skip = {"params", "companion"} if companion else unread
            lines += [f"    {k}: {g[k]}" for k in sorted(g) if k not in skip]
        return "\n".join(lines) + "\n)"


def _memory(t: Tensor) -> tuple[int, int] | None:
    """The bytes ``[start, end)`` that ``t`` (this rank's part of it) spans; None where it holds none."""
    t = local(t)
    if t.numel() == 0 or t.device.type == "meta":
        return None
    span = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    low = t.data_ptr() - t.element_size() * sum((n - 1) * -st for n, st in zip(t.shape, t.stride()) if st < 0)
    return low, low + span * t.element_size()


def _refuse_shared_memory(pairs: list[LoRAPair], companion: list[Tensor], names: list[str | None]) -> None:
    """A pair's factors are written by copying the new factors in, so a distinct tensor over the
    same memory (tied weights) loses whatever its own update wrote (the companion's AdamW step,
    and with it that tensor's gradient; another pair's step). Refused, naming both. Tensors that
    merely live in one buffer side by side pass; so do tied companion tensors, as torch's AdamW
    takes them (its in-place steps add up)."""
    items = [(f"pair {p.name}", t, True) for p in pairs for t in (p.B, p.A)]
    items += [(f"companion tensor {n or f'#{i}'}", t, False) for i, (n, t) in enumerate(zip(names, companion))]
    spans = sorted((span, label, factor, id(t)) for label, t, factor in items if (span := _memory(t)) is not None)
    reach = {True: (0, "", 0, True), False: (0, "", 0, True)}  # the furthest end so far, of factors and of any tensor
    for (low, high), label, factor, tid in spans:
        end, other, oid, other_factor = reach[not factor]
        if low < end and oid != tid:
            (a, _), (b, _) = sorted([(label, factor), (other, other_factor)], key=lambda x: x[1])  # a companion first
            raise ValueError(
                f"{a} shares memory with {b} (tied weights, such as PEFT's ensure_weight_tying=True): the pair's step "
                "overwrites that memory and would erase the other's update with its gradient; give ODELoRA untied "
                "tensors (ensure_weight_tying=False, or only one of the tied layers among the LoRA targets)")
        if factor and high > reach[True][0]:
            reach[True] = (high, label, tid, True)
        if high > reach[False][0]:
            reach[False] = (high, label, tid, factor)


def _warn_about_starts(store: PairStore, factor_space_adaptive: bool) -> None:
    """Warn about starts no step will leave (unsharded parameters with values only; checked once):
    pairs with ``B = 0`` and ``A = 0``, which the gradient reaches through neither factor, and
    ``B = 0`` (PEFT's start) under adaptive factor-space steps, whose error estimate rejects every
    step there."""
    zero, b_zero = [], []
    for b in store.buckets:
        if b.sharded or b.Bs[0].device.type == "meta":
            continue
        for B, A, n in zip(b.Bs, b.As, b.names):
            if not bool(B.detach().any()):
                (b_zero if bool(A.detach().any()) else zero).append(n)
    if zero:
        warn(f"{len(zero)} LoRA pair(s) with B = 0 and A = 0 ({_short(zero)}): no flow moves them, since the "
             "gradient reaches neither factor; initialize A (PEFT's default) or both (odelora.init.gaussian_ or spectral_)")
    if b_zero and factor_space_adaptive:
        warn(f"{len(b_zero)} LoRA pair(s) start at B = 0 ({_short(b_zero)}), where this flow's adaptive factor-space "
             "steps (retraction 'none' or 'balance') find no step and stop with StepFailure: use the default retraction "
             "('truncate'), a fixed-step method, or start from balanced factors (odelora.init.spectral_)")


def _start_imbalance(x: Factors) -> float:
    """``geometry.imbalance`` of a state (max over its pairs), from its frame when it has one."""
    fr = x.frame
    if fr is not None and fr.balanced:  # sA == sB and PA == PB: B.T B == A A.T exactly
        return 0.0
    return float(imbalance(x.B, x.A, fr).max())
