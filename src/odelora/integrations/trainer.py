"""transformers Trainer with ODELoRA, multi-stage methods included, and its statistics in the logs.

    trainer = ODELoRATrainer(model=peft_model, args=args, train_dataset=ds,
                             odelora_kwargs=dict(method="rk4", companion_lr=1e-3))

``args.learning_rate`` is the ODELoRA step h; ``weight_decay``, ``adam_beta1``, ``adam_beta2`` and
``adam_epsilon`` set the AdamW companion's options, biases and norms without weight decay as
in the Trainer (and the pairs' options with ``preconditioner="adam"``);
the companion's rate is ``companion_lr`` (default 1e-3), not ``args.learning_rate``. The Trainer backpropagates one batch before calling
``optimizer.step()`` without a closure; ``training_step`` therefore hands the optimizer a closure
that recomputes the loss on the same batch, which the remaining RK stages call (gradient clipping
at ``args.max_grad_norm`` is applied to every stage alike). Each stage starts from the random
state of the first, so dropout draws the same masks in every stage: the stages evaluate one
function.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from .._warnings import warn
from ..optim import ODELoRA
from .peft import create_odelora_optimizer

__all__ = ["ODELoRATrainer", "ODELoRACallback"]


def _unwrap(optimizer) -> ODELoRA | None:
    while optimizer is not None and not isinstance(optimizer, ODELoRA):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class ODELoRACallback(TrainerCallback):
    """Adds ODELoRA's statistics to every Trainer log entry: gradient evaluations per step, the
    step h, integration time t, imbalance, and rejected / non-finite / skipped step counts."""

    def __init__(self):
        self._nfe = 0
        self._steps = 0

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        opt = _unwrap(optimizer)
        if opt is not None and opt.stats.steps:
            self._nfe += opt.last_step.nfe
            self._steps += 1

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        opt = _unwrap(optimizer)
        if opt is None or logs is None or "loss" not in logs:
            return
        last = opt.last_step
        stats = {
            "odelora_nfe_per_step": self._nfe / max(self._steps, 1),
            "odelora_nfe_total": opt.stats.nfe,
            "odelora_h": last.h,
            "odelora_t": last.t,
            "odelora_imbalance": last.imbalance,
            "odelora_rejected": opt.stats.rejected,
            "odelora_nonfinite": opt.stats.nonfinite,
            "odelora_skipped": opt.stats.skipped,
        }
        stats = {k: v for k, v in stats.items() if v is not None}
        logs.update(stats)
        if state.log_history:
            state.log_history[-1].update(stats)
        self._nfe = self._steps = 0


def _rng_state() -> tuple:
    """The CPU generator's state and, once CUDA is in use, every GPU's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class ODELoRATrainer(Trainer):
    """A ``Trainer`` whose optimizer is ``create_odelora_optimizer(model, lr=args.learning_rate,
    **odelora_kwargs)`` (LoRA pairs follow the flow, other trainable tensors an AdamW companion),
    or the ODELoRA optimizer passed as ``optimizers=(optimizer, scheduler)``.

    ``lr`` is a time step, so the step's length follows the gradient's scale. The Trainer gives a
    model whose ``forward`` takes ``**kwargs`` the batch's label count and then leaves the loss
    to it: not divided by the accumulation steps, and multiplied by the number of processes
    under DDP. A loss that ignores the count (sequence classification heads) is then that many
    times too large, and so is the step; one that divides by it (causal LMs through
    transformers' loss functions) is the exact mean over the labels of all micro-batches. So
    this Trainer asks the loss (``compute_loss``: a subclass's own, where it overrides it), at the
    first micro-batch with unmasked labels: two more calls of ``compute_loss`` (counters it keeps
    see them), without backward, with counts 1 and 2, from the same random state. Where the loss halves, the Trainer's
    accumulation stays as it is; elsewhere (unless a ``compute_loss_func`` or label smoothing
    computes the loss) ``model_accepts_loss_kwargs`` is set False: every batch's loss is the
    model's mean, divided by the accumulation steps, as for a model without ``**kwargs``."""

    def __init__(self, *args, odelora_kwargs: dict[str, Any] | None = None, **kwargs):
        self.odelora_kwargs = dict(odelora_kwargs or {})
        if "lr" in self.odelora_kwargs:
            raise TypeError("odelora_kwargs must not set lr: ODELoRA's step h is TrainingArguments' learning_rate")
        known = {"adapter", "decay"} | set(inspect.signature(ODELoRA.__init__).parameters) - {"self", "params", "lr", "companion"}
        unknown = sorted(set(self.odelora_kwargs) - known)
        if unknown:
            raise TypeError(f"odelora_kwargs has unknown key(s) {unknown}: it takes ODELoRA's options and "
                            f"create_odelora_optimizer's adapter and decay, {sorted(known)}")
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(c is ODELoRACallback or isinstance(c, ODELoRACallback) for c in callbacks):
            callbacks.append(ODELoRACallback())
        super().__init__(*args, callbacks=callbacks, **kwargs)
        from ..integrators import get_tableau

        # the statistics join a log entry before the loggers (TensorBoard, wandb, ...) write it
        handler = self.callback_handler
        handler.callbacks.sort(key=lambda c: not isinstance(c, ODELoRACallback))
        if self.optimizer is not None and self.odelora is None:
            raise TypeError(f"ODELoRATrainer trains with ODELoRA, and was given a {type(self.optimizer).__name__}: pass "
                            "optimizers=(ODELoRA(...), scheduler) or no optimizer, or use transformers' Trainer")
        self._warn_unused_optimizer_args()
        self._warn_default_learning_rate()
        # whether the model's loss divides by the label count it is given: asked at the first micro-batch
        # that can tell (label smoothing computes its own loss, which transformers < 5 leaves undivided)
        ask = self.model_accepts_loss_kwargs and self.compute_loss_func is None and self.label_smoother is None
        self._loss_counts = None if ask else False
        if self.compute_loss_func is None:
            self.model_accepts_loss_kwargs = False  # until the model says otherwise
        given = self.odelora  # optimizers=(ODELoRA(...), scheduler)
        stages = given.tableau.stages if given is not None else get_tableau(self.odelora_kwargs.get("method", "euler")).stages
        if stages > 1 and self.args.gradient_accumulation_steps > 1:
            raise ValueError(
                "multi-stage ODELoRA methods re-evaluate the loss on the step's batch; use "
                "gradient_accumulation_steps=1 (raise the batch size instead) or method='euler'"
            )
        if stages > 1 and self.args.fp16:
            raise ValueError(
                "fp16 loss scaling unscales a step's gradients once, while multi-stage ODELoRA methods take a "
                "gradient at every stage; use bf16=True (no loss scaling) or method='euler'"
            )

    def _warn_unused_optimizer_args(self) -> None:
        """The Trainer's own ways of choosing an optimizer, which this one does not read."""
        from transformers import TrainingArguments

        unused = []
        default = TrainingArguments.__dataclass_fields__["optim"].default
        if str(getattr(self.args.optim, "value", self.args.optim)) != str(getattr(default, "value", default)):
            unused.append(f"optim={getattr(self.args.optim, 'value', self.args.optim)!r}")
        if self.args.optim_args:
            unused.append(f"optim_args={self.args.optim_args!r}")
        if getattr(self, "optimizer_cls_and_kwargs", None) is not None:
            unused.append("optimizer_cls_and_kwargs")
        if unused:
            warn(f"ODELoRATrainer ignores {', '.join(unused)}: its optimizer is ODELoRA (options: odelora_kwargs)", UserWarning)

    def _warn_default_learning_rate(self) -> None:
        """The Trainer's default rate suits AdamW; as ODELoRA's time step it barely moves the factors."""
        from transformers import TrainingArguments

        default = TrainingArguments.__dataclass_fields__["learning_rate"].default
        given = self.odelora is not None  # optimizers=(ODELoRA(..., lr=...), scheduler): its own lr
        if not given and self.args.learning_rate == default and self.odelora_kwargs.get("preconditioner") != "adam":
            warn(f"learning_rate is TrainingArguments' default {default:g}, chosen for AdamW: for ODELoRATrainer it is the "
                 "flow's time step h, in the gradient's units (steps of 0.01-0.1 are usual; the README uses 0.05); set "
                 "learning_rate, or use odelora_kwargs=dict(preconditioner='adam') for AdamW-like rates", UserWarning)

    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kwargs):
        batches, count = super().get_batch_samples(epoch_iterator, num_batches, *args, **kwargs)
        device = args[0] if args else kwargs.get("device")  # (transformers < 4.50 passes none, nor counts labels)
        if self._loss_counts is None and device is not None and hasattr(self, "_get_num_items_in_batch"):
            for batch in batches:  # the first micro-batch that can tell (one with every label masked cannot),
                answer = self._loss_divides_by_count(batch) if "labels" in batch else None
                self._loss_counts = self._agreed(answer)  # in step across processes: FSDP's forwards gather together
                if self._loss_counts is not None:
                    break
            if self._loss_counts:
                self.model_accepts_loss_kwargs = True
                count = self._get_num_items_in_batch(batches, device)
        return batches, count

    def _agreed(self, answer: bool | None) -> bool | None:
        """One answer for all processes (they must count labels alike, or the count's gather waits
        forever): no where any says no, undecided (ask again) where any could not tell."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return answer
        code = torch.tensor([{False: 0, None: 1, True: 2}[answer]], device=self.args.device)
        dist.all_reduce(code, op=dist.ReduceOp.MIN)
        return {0: False, 1: None, 2: True}[int(code)]

    def _loss_divides_by_count(self, batch: dict) -> bool | None:
        """Whether the loss on ``batch`` halves when ``num_items_in_batch`` doubles, asked through
        ``compute_loss`` (a subclass's own loss too) as the Trainer will compute it (same
        random state for both forwards, which leave no gradient and no trace in the generators or
        the buffers: batch norms' running statistics are put back); None where the batch cannot
        tell (a zero or non-finite loss: every label masked, say)."""
        inputs, rng, losses = self._prepare_inputs(copy.copy(batch)), _rng_state(), []
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        accepts, self.model_accepts_loss_kwargs = self.model_accepts_loss_kwargs, True  # compute_loss passes the count on
        try:
            with torch.enable_grad(), self.compute_loss_context_manager():  # a loss may take gradients itself (a penalty)
                for count in (1.0, 2.0):
                    _set_rng_state(rng)
                    loss = self.compute_loss(self.model, dict(inputs), num_items_in_batch=torch.tensor(count, device=self.args.device))
                    if not (torch.is_tensor(loss) and loss.numel() == 1):
                        return False
                    losses.append(loss.detach().double())
        finally:
            self.model_accepts_loss_kwargs = accepts
            _set_rng_state(rng)
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
        one, two = losses
        if not bool(torch.isfinite(one) & torch.isfinite(two) & (one != 0)):
            return None
        return bool((one - 2 * two).abs() <= 1e-3 * one.abs())

    def train(self, *args, **kwargs):
        self._steps_seen = None  # a new run's first step (resuming on this trainer) records its own loss
        return super().train(*args, **kwargs)

    @property
    def odelora(self) -> ODELoRA | None:
        """The ODELoRA optimizer (``last_step``, ``stats``), which ``self.optimizer`` wraps once
        the Trainer has prepared it (accelerate's ``AcceleratedOptimizer``); None before
        ``create_optimizer``."""
        return _unwrap(self.optimizer)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = model if model is not None else self.model
            self.optimizer = create_odelora_optimizer(model, lr=self.args.learning_rate, **self._optimizer_kwargs(model))
            if self.args.weight_decay and self.odelora_kwargs.get("preconditioner") != "adam":
                own = "weight_decay" in (self.odelora_kwargs.get("companion_kwargs") or {})
                where = ("the AdamW companion only (heads and other tensors that are not LoRA pairs)"
                         if self.odelora._companion is not None and not own else
                         "nothing: odelora_kwargs' companion_kwargs set the companion's own" if own else
                         "nothing: only LoRA pairs train")
                warn(f"weight_decay={self.args.weight_decay:g} applies to {where}: ODELoRA's steps of the LoRA pairs have "
                     "none, except with odelora_kwargs=dict(preconditioner='adam')", UserWarning)
        return self.optimizer

    def _optimizer_kwargs(self, model) -> dict[str, Any]:
        """``odelora_kwargs`` with the arguments' AdamW settings (``weight_decay``, ``adam_beta1``,
        ``adam_beta2``, ``adam_epsilon``) for the companion, whose biases and norms take no weight
        decay (the Trainer's rule), and, with ``preconditioner="adam"``, for the pairs; what
        ``odelora_kwargs`` sets wins."""
        args, kw = self.args, dict(self.odelora_kwargs)
        adam = dict(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, weight_decay=args.weight_decay)
        kw["companion_kwargs"] = {**adam, **(kw.get("companion_kwargs") or {})}
        kw.setdefault("decay", self.get_decay_parameter_names(model))
        if kw.get("preconditioner") == "adam":
            kw = {**adam, **kw}
        return kw

    def training_step(self, model, inputs, num_items_in_batch=None):
        prepared = self._prepare_inputs(inputs)
        opt = self.odelora
        multi = opt is not None and opt.tableau.stages > 1
        rng = _rng_state() if multi else None  # where the first stage's forward starts
        # compute_loss may take labels out of its inputs (label smoothing, compute_loss_func): each
        # stage gets its own copy of the batch
        loss = super().training_step(model, copy.copy(prepared) if multi else prepared, num_items_in_batch)
        closure = None
        if multi:

            def closure():
                _set_rng_state(rng)  # the first stage's dropout masks: every stage sees the same function
                model.zero_grad(set_to_none=True)
                with self.compute_loss_context_manager():
                    stage_loss = self.compute_loss(model, copy.copy(prepared), num_items_in_batch=num_items_in_batch)
                if self.args.n_gpu > 1:
                    stage_loss = stage_loss.mean()  # DataParallel's per-device losses, as the Trainer's step
                self.accelerator.backward(stage_loss)
                if self.args.max_grad_norm and self.args.max_grad_norm > 0:
                    self.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
                return stage_loss.detach()

        if opt is not None:  # the loss of the gradients in .grad: the Trainer's, summed over one step's micro-batches
            if self.state.global_step != getattr(self, "_steps_seen", None):  # (counted also where a GradScaler skips the step)
                self._steps_seen, self._step_loss = self.state.global_step, 0.0
            self._step_loss = self._step_loss + loss.detach()
            opt.set_stage_closure(closure, loss=self._step_loss)
        return loss
