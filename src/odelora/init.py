"""Starts for LoRA factors: a small Gaussian start and a spectral start from the full-weight gradient.

    gaussian_(model, alpha)            B = 0, A ~ N(0, alpha^2)         (Xu et al.'s small start)
    spectral_(model, closure, alpha)   B, A from the top-r SVD of -G    (G: the full-weight gradient)

Both work on any model whose LoRA layers look like PEFT's (a module with ``lora_A`` and
``lora_B`` module dicts keyed by adapter name, a ``scaling`` dict and a base layer), for every
adapter or the ones named. Per-layer scaling: a layer computes ``W0 + s B A``; in the coordinates
``B' = sqrt(s) B``, ``A' = sqrt(s) A`` the weight change is ``B' A'`` whatever ``s`` is (``lora_alpha
/ r``, rsLoRA, ``rank_pattern``), and ``alpha`` is the scale of ``B'`` and ``A'``. So the spectral
start changes every adapted weight by ``s B A = alpha^2 U_r V_r^T`` and the Gaussian one draws
``sqrt(s) A`` from N(0, alpha^2); with ``s = 1`` both are literally as written above.

The full-weight gradient ``G = dL/dW`` of an adapted layer ``y = x W^T``: ``dense_gradients`` adds
``x D^T`` with a zero matrix ``D`` to each base layer's output during one closure call (forward and
backward) and reads ``dL/dD``, which is ``dL/dW`` along every path W takes, also through
derivatives of the network in the loss (a PINN's residual); the sum over rows of ``g^T x``
(``g = dL/dy``) would miss those. No base weight needs ``requires_grad`` (quantized ones work) and
none is changed; the gradients the closure leaves in ``.grad`` are put back as they were. This is
a core module: it imports nothing from ``integrations`` or ``lab``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from ._warnings import warn
from .geometry import rounding_scale

__all__ = ["AdaptedLayer", "adapted_layers", "dense_gradients", "gaussian_", "spectral_"]


@dataclass(frozen=True)
class AdaptedLayer:
    """One adapter of one LoRA layer: ``W = W0 + scale * B @ A`` (``path`` names the module)."""

    path: str
    adapter: str
    module: nn.Module
    base: nn.Module
    B: Tensor
    A: Tensor
    scale: float

    @property
    def name(self) -> str:
        return f"{self.path}[{self.adapter}]"


def _wanted(adapter: str | Iterable[str] | None) -> set[str] | None:
    if adapter is None:
        return None
    return {adapter} if isinstance(adapter, str) else set(adapter)


def adapted_layers(model: nn.Module, adapter: str | Iterable[str] | None = None) -> list[AdaptedLayer]:
    """Every (layer, adapter) with LoRA factors in ``model``, found by module (PEFT's layout:
    ``lora_A[name]``, ``lora_B[name]``, ``scaling[name]``, ``base_layer``); ``adapter`` limits it to
    one name or a list of names. Raises if a named adapter is found nowhere."""
    wanted = _wanted(adapter)
    out = []
    for path, mod in model.named_modules():
        la, lb, sc = getattr(mod, "lora_A", None), getattr(mod, "lora_B", None), getattr(mod, "scaling", None)
        if not (isinstance(la, nn.ModuleDict) and isinstance(lb, nn.ModuleDict) and isinstance(sc, dict)):
            continue
        base = mod.get_base_layer() if hasattr(mod, "get_base_layer") else getattr(mod, "base_layer", None)
        for ad in la.keys():
            if (wanted is not None and ad not in wanted) or ad not in lb or ad not in sc:
                continue
            out.append(AdaptedLayer(path, ad, mod, base, lb[ad].weight, la[ad].weight, float(sc[ad])))
    if wanted is not None:
        missing = wanted - {x.adapter for x in out}
        if missing:
            raise ValueError(f"no LoRA layers with adapter(s) {sorted(missing)} in the model")
    if not out:
        raise ValueError("the model has no LoRA layers (modules with lora_A, lora_B and scaling); wrap it with "
                         "peft.get_peft_model first")
    return out


def _scaled(layers: list[AdaptedLayer]) -> list[AdaptedLayer]:
    """The layers, refusing a scaling that is not positive (``lora_alpha = 0``): ``alpha`` is the
    size of ``sqrt(s) B`` and ``sqrt(s) A``, which no factors reach there."""
    bad = [f"{x.name} ({x.scale:g})" for x in layers if not (x.scale > 0 and math.isfinite(x.scale))]
    if bad:
        raise ValueError(f"LoRA scaling s = lora_alpha / r (or / sqrt(r)) must be positive for a start of size alpha; not so "
                         f"for {', '.join(bad)}: give lora_alpha > 0")
    return layers


def _matrix_layers(layers: list[AdaptedLayer]) -> list[AdaptedLayer]:
    bad = [x.name for x in layers if x.A.ndim != 2 or x.B.ndim != 2 or x.base is None]
    if bad:
        raise ValueError(f"spectral starts need LoRA on linear layers (matrix factors); not so for {', '.join(bad)}; "
                         "pass adapter= to choose others")
    return layers


def dense_gradients(model: nn.Module, closure: Callable[[], object], adapter: str | Iterable[str] | None = None,
                    dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The full-weight gradient ``dL/dW`` (shape of ``B @ A``: out x in) of every adapted linear
    layer, from one call of ``closure`` (which must run the forward pass and ``backward()``).

    Keys are module paths. Accumulated over every call of a layer in the closure (a layer used
    twice, gradient accumulation inside the closure), in ``dtype`` (default: the factors' dtype,
    at least float32). Base weights are neither changed nor given ``requires_grad``; the ``.grad``
    of every parameter of ``model`` is restored to what it was before the call.
    """
    layers = _matrix_layers(adapted_layers(model, adapter))
    by_path: dict[str, AdaptedLayer] = {}
    for x in layers:
        by_path.setdefault(x.path, x)
    # Each base layer's output gets ``x D^T`` with a zero leaf D: its value changes nothing, and
    # dL/dD is dL/dW along every path W takes, the derivatives of the output in a loss included.
    deltas = {}
    for path, x in by_path.items():
        dt = dtype or torch.promote_types(x.A.dtype, torch.float32)
        deltas[path] = torch.zeros(x.B.shape[0], x.A.shape[1], dtype=dt, device=x.A.device, requires_grad=True)

    def hook_for(path: str, D: Tensor):
        m, n = D.shape

        def fwd(mod, args, out):
            x = args[0] if args else None
            if not (torch.is_tensor(x) and torch.is_tensor(out) and x.shape[-1] == n and out.shape[-1] == m):
                raise ValueError(f"{path}: expected a linear base layer with inputs (..., {n}) and outputs (..., {m})")
            with torch.autocast(x.device.type, enabled=False):  # dL/dD in D's precision, not in autocast's bf16/fp16
                return out + nn.functional.linear(x.to(D.dtype), D).to(out.dtype)

        return fwd

    handles = []
    saved = {p: p.grad for p in model.parameters()}
    try:
        for p in saved:
            p.grad = None
        for path, x in by_path.items():
            handles.append(x.base.register_forward_hook(hook_for(path, deltas[path])))
        with torch.enable_grad():
            closure()
    finally:
        for h in handles:
            h.remove()
        for p, g in saved.items():
            p.grad = g
    acc = {path: D.grad for path, D in deltas.items()}
    missing = [p for p, G in acc.items() if G is None]
    if missing:
        raise RuntimeError(f"the closure ran no backward pass through {', '.join(missing)}; it must compute the loss "
                           "and call loss.backward()")
    return acc


@torch.no_grad()
def gaussian_(model: nn.Module, alpha: float, *, adapter: str | Iterable[str] | None = None,
              generator: torch.Generator | None = None) -> list[str]:
    """Xu et al.'s small start: ``B = 0`` and ``A`` with iid N(0, alpha^2 / s) entries (``s`` the
    layer's scaling: ``sqrt(s) A ~ N(0, alpha^2)``). Returns the names of the layers set."""
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    layers = _scaled(adapted_layers(model, adapter))
    for x in layers:
        x.B.zero_()
        noise = torch.randn(x.A.shape, generator=generator, dtype=torch.float64, device=generator.device if generator is not None else "cpu")
        x.A.copy_((alpha / math.sqrt(x.scale)) * noise)
    return [x.name for x in layers]


@torch.no_grad()
def spectral_(model: nn.Module, closure: Callable[[], object], alpha: float, *,
              adapter: str | Iterable[str] | None = None) -> dict[str, Tensor]:
    """A small balanced start along the top-r singular subspaces of the negative full-weight
    gradient of each adapted layer, from one call of ``closure`` (forward and backward on a batch).

    With ``-G = U S V^T`` and r the layer's rank: ``B = alpha/sqrt(s) U_r`` and ``A = alpha/sqrt(s)
    V_r^T``, so the weight changes by ``s B A = alpha^2 U_r V_r^T``, which points downhill
    (``<s B A, -G> = alpha^2 (S_1 + ... + S_r) >= 0``), and the factors are balanced
    (``B^T B = A A^T = alpha^2 / s I``). Base weights are not changed. Returns the top-r singular
    values of ``-G`` per layer name.

    A gradient of rank k < r (a batch smaller than r, a zero gradient) determines only k
    directions: its singular values below ``eps^(3/4)`` of the largest (``eps`` of the gradient's
    dtype) are rounding, whose vectors LAPACK picks arbitrarily. Those directions start as PEFT's
    (``B``'s column 0, ``A``'s row ``alpha/sqrt(s)`` times a singular vector), so that the product
    is ``alpha^2 U_k V_k^T``, and a warning names the layer.
    """
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    layers = _scaled(_matrix_layers(adapted_layers(model, adapter)))
    for x in layers:
        r, (m, n) = x.A.shape[0], (x.B.shape[0], x.A.shape[1])
        if r > min(m, n):
            raise ValueError(f"{x.name}: rank {r} exceeds min(out, in) = {min(m, n)}; no r orthonormal singular vectors. "
                             "Give this layer a rank <= min(out, in) or leave it out of the adapter (PEFT's target_modules, "
                             "or add_lora's target for DeepXDE), or start it with gaussian_")
    grads = dense_gradients(model, closure, adapter)
    sing, short = {}, []
    for x in layers:
        r = x.A.shape[0]
        G = grads[x.path]
        U, S, Vh = torch.linalg.svd(-G.to(torch.float64), full_matrices=False)
        S = torch.where(S > 0, S, 0.0)[:r]  # (LAPACK may return -0.0)
        known = S > rounding_scale(S, G.dtype)
        c = alpha / math.sqrt(x.scale)
        x.B.copy_(c * U[:, :r] * known)
        x.A.copy_(c * Vh[:r])
        sing[x.name] = S.to(torch.float32)
        if not bool(known.all()):
            short.append(f"{x.name} ({int(known.sum())} of {r})")
    if short:
        warn("spectral_: the gradient determines fewer than r directions of " + ", ".join(short) + "; the others start as "
             "PEFT's (B = 0 there). A larger batch in the closure gives more", RuntimeWarning)
    return sing
