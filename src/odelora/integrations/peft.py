"""Find LoRA pairs in PEFT models, by module, with each layer's own scaling.

Rule for everything else that is trainable (documented in ``partition``): it is returned in
``others`` with the reason, and :func:`create_odelora_optimizer` moves it with an AdamW companion.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch

from .._warnings import warn
from ..optim import ODELoRA
from ..pairs import FSDP1_ADVICE, LoRAPair

__all__ = ["lora_pairs", "partition", "Partition", "create_odelora_optimizer"]


@dataclass
class Partition:
    pairs: list[LoRAPair] = field(default_factory=list)
    others: list[tuple[str, torch.Tensor, str]] = field(default_factory=list)  # (name, param, reason)
    adapters: list[str] = field(default_factory=list)  # every LoRA adapter the model has
    left: list[str] = field(default_factory=list)  # trainable factors of adapters not selected: not moved
    unmovable: list[str] = field(default_factory=list)  # LoRA layers with no matrix pair (embedding, conv, experts)
    frozen: list[str] = field(default_factory=list)  # LoRA layers with both factors frozen: not in the optimizer

    def summary(self) -> str:
        lines = [f"{len(self.pairs)} LoRA pairs follow the flow"]
        if self.others:
            lines.append(f"{len(self.others)} other trainable tensor{'s go' if len(self.others) > 1 else ' goes'} to the AdamW companion:")
            lines += [f"  {n} {tuple(p.shape)}: {why}" for n, p, why in self.others]
        if self.left:
            lines.append(f"{len(self.left)} trainable LoRA factors of adapters not selected are left as they are")
        if self.frozen:
            lines.append(f"{len(self.frozen)} LoRA pair{'s are' if len(self.frozen) > 1 else ' is'} frozen (inactive adapters, "
                         f"frozen layers: {', '.join(self.frozen[:3])}{', ...' if len(self.frozen) > 3 else ''}) and not in the "
                         "optimizer: unfrozen later, " + ("they stay as they are" if len(self.frozen) > 1 else "it stays as it is")
                         + " until the optimizer is built again")
        return "\n".join(lines)


def _adapters(adapter) -> set[str] | None:
    if adapter is None:
        return None
    return {adapter} if isinstance(adapter, str) else set(adapter)


def _fsdp1(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


# LoRA variants (PEFT's ``lora_variant``) whose update is still a function of ``s * B @ A`` with
# free factors: DoRA normalizes ``W0 + s B A`` column by column (its magnitudes are companions;
# its convolution factors are no matrices), aLoRA applies it to the tokens after its invocation,
# QA-LoRA to pooled inputs
PRODUCT_VARIANTS = {"DoraLinearVariant", "DoraEmbeddingVariant", "DoraConv1dVariant", "DoraConv2dVariant", "DoraConv3dVariant",
                    "ALoraLinearVariant", "QALoraLinearVariant"}


def _weight(t):
    """A factor's tensor: ``nn.Linear``'s weight, or the parameter itself (AdaLoRA's factors)."""
    return t.weight if isinstance(t, torch.nn.Module) else t


def _other_update(module, ad: str) -> str | None:
    """What the layer does with the factors where its update is not ``s * B @ A`` of free
    factors (AdaLoRA, and PEFT's LoRA variants other than DoRA, such as KaSA and BD-LoRA); None
    where it is."""
    if not isinstance(module.lora_A[ad], torch.nn.Module):
        return "AdaLoRA, whose update is B (A * E) scaled by the rank it keeps"
    variant = getattr(module, "lora_variant", {}).get(ad)
    if variant is not None and type(variant).__name__ not in PRODUCT_VARIANTS:
        return f"the {type(variant).__name__.removesuffix('LinearVariant') or type(variant).__name__} variant"
    return None


def partition(model: torch.nn.Module, adapter: str | list[str] | None = None) -> Partition:
    """Split the trainable parameters of a PEFT model into LoRA pairs and the rest.

    A pair is the ``lora_B``/``lora_A`` weights of one adapter in one ``LoraLayer`` whose factors
    are matrices (Linear layers, also under DoRA), with that layer's ``scaling[adapter]`` (which
    already reflects rsLoRA, ``rank_pattern`` and ``alpha_pattern``). Everything else that is
    trainable goes to ``others``: DoRA magnitude vectors, embedding LoRA (``lora_embedding_*``),
    convolution LoRA (4-D factors), the factors of AdaLoRA and of LoRA variants other than DoRA
    (KaSA, BD-LoRA, ...: their update is not ``s * B @ A`` of free factors; with a warning),
    biases, heads and ``modules_to_save``. The factors of adapters
    outside ``adapter`` (a name or list of names; default all) keep their trainable flags but are
    moved by nothing: they are listed in ``left``, with a warning where they are trainable.
    Adapters merged into their base weights (``merge_adapter()``) are refused: the forward pass
    no longer reads their factors.
    """
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError as err:  # pragma: no cover
        raise SystemExit("odelora.integrations.peft needs peft: pip install 'odelora[hf]'") from err
    if _fsdp1(model):  # its parameters are views into flat shards: no LoRA factor is a matrix
        raise NotImplementedError(f"the model is wrapped in FSDP1 (FullyShardedDataParallel), {FSDP1_ADVICE}")
    wanted = _adapters(adapter)
    part = Partition()
    in_pair: set[int] = set()
    reasons: dict[int, str] = {}
    unselected: set[int] = set()
    adapters: set[str] = set()
    half_frozen, experts, variants, merged = [], [], [], []
    for mname, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if wanted is None or wanted & set(module.lora_A.keys()):  # a merged layer runs its base layer alone, for every adapter
            merged += [f"{mname}[{ad}]" for ad in getattr(module, "merged_adapters", [])]
        adapters.update(module.lora_A.keys())
        adapters.update(getattr(module, "lora_embedding_A", {}).keys())
        for ad in module.lora_A.keys():
            A, B = _weight(module.lora_A[ad]), _weight(module.lora_B[ad])
            if wanted is not None and ad not in wanted:
                unselected.update((id(A), id(B)))
                continue
            other = _other_update(module, ad)
            if other is not None and (A.requires_grad or B.requires_grad):
                reasons[id(A)] = reasons[id(B)] = f"LoRA factors of {other}"
                variants.append(f"{mname}[{ad}] ({other.split(',')[0]})")
                part.unmovable.append(f"{mname}[{ad}]")
                continue
            if not (A.requires_grad and B.requires_grad):
                if A.requires_grad or B.requires_grad:  # e.g. LoRA-FA's frozen A: no pair to move as a product
                    frozen = "lora_A" if B.requires_grad else "lora_B"
                    reasons[id(B if B.requires_grad else A)] = f"LoRA factor whose partner {frozen} is frozen"
                    half_frozen.append(f"{mname}[{ad}]")
                else:
                    part.frozen.append(f"{mname}[{ad}]")
                continue
            if A.ndim != 2 or B.ndim != 2:
                reasons[id(A)] = reasons[id(B)] = f"{type(module.lora_A[ad]).__name__} LoRA factors are not matrices"
                part.unmovable.append(f"{mname}[{ad}]")
                continue
            if getattr(module, "num_experts", 1) > 1:  # target_parameters on stacked experts: one product per expert
                reasons[id(A)] = reasons[id(B)] = f"LoRA factors of {module.num_experts} experts, whose products (not B @ A) enter the model"
                experts.append(f"{mname}[{ad}]")
                part.unmovable.append(f"{mname}[{ad}]")
                continue
            part.pairs.append(LoRAPair(B, A, float(module.scaling[ad]), f"{mname}[{ad}]"))
            in_pair.update((id(A), id(B)))
        for ad, p in getattr(module, "lora_embedding_A", {}).items():
            if wanted is not None and ad not in wanted:
                unselected.add(id(p))
                continue
            reasons[id(p)] = "embedding LoRA"
            part.unmovable.append(f"{mname}[{ad}]")
        for ad, p in getattr(module, "lora_embedding_B", {}).items():
            if wanted is not None and ad not in wanted:
                unselected.add(id(p))
                continue
            reasons[id(p)] = "embedding LoRA"
        for ad, mag in getattr(module, "lora_magnitude_vector", {}).items():
            for p in mag.parameters():
                if wanted is not None and ad not in wanted:
                    unselected.add(id(p))
                else:
                    reasons[id(p)] = "DoRA magnitude vector"
    if merged:  # their factors are in the base weights: the forward no longer reads them
        named = ", ".join(merged[:3]) + (", ..." if len(merged) > 3 else "")
        raise ValueError(f"adapters merged into their base weights ({named}): the forward pass no longer reads their "
                         "factors; call model.unmerge_adapter() before training (and merge_adapter() after)")
    if wanted is not None:
        found = {p.name.rsplit("[", 1)[1].rstrip("]") for p in part.pairs}
        missing = wanted - found
        unmovable = {n.rsplit("[", 1)[1].rstrip("]") for n in part.unmovable}
        frozen = sorted(missing & (adapters - unmovable))
        odd = sorted(missing & unmovable)
        if odd and not frozen:
            raise ValueError(f"adapter(s) {odd} have no matrix pair B @ A for ODELoRA to move (embedding, convolution or "
                             "stacked-expert LoRA, AdaLoRA or a LoRA variant other than DoRA): train them with a torch "
                             "optimizer (AdamW)")
        if frozen:
            raise ValueError(f"adapter(s) {frozen} have no pair with both factors trainable (inactive or frozen): make them "
                             "trainable with model.set_adapter(name) or requires_grad_(True) on their lora_A and lora_B")
        if missing:
            raise ValueError(f"no LoRA adapter(s) {sorted(missing)}; the model's adapters: {sorted(adapters) or 'none'}")
    if half_frozen:
        warn(f"{len(half_frozen)} LoRA layer(s) with one factor frozen ({', '.join(half_frozen[:3])}"
             f"{', ...' if len(half_frozen) > 3 else ''}): their trainable factor goes to the AdamW companion, "
             "not the flow; unfreeze both factors for ODELoRA to move them")
    if variants:
        warn(f"{len(variants)} LoRA layer(s) whose update is not s * B @ A of free factors ({', '.join(variants[:3])}"
             f"{', ...' if len(variants) > 3 else ''}): their factors go to the AdamW companion, since ODELoRA's flows "
             "move the product s * B @ A", UserWarning)
    if experts:
        warn(f"{len(experts)} LoRA layer(s) of stacked experts ({', '.join(experts[:3])}{', ...' if len(experts) > 3 else ''}): "
             "their factors go to the AdamW companion, since the model depends on each expert's product, not on B @ A")
    part.adapters = sorted(adapters)
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) in unselected:
            part.left.append(name)
        elif p.requires_grad and id(p) not in in_pair:
            why = reasons.get(id(p)) or ("bias" if name.endswith("bias") else "not a LoRA factor (head, modules_to_save, ...)")
            part.others.append((name, p, why))
    if part.left:
        warn(f"{len(part.left)} trainable LoRA factor(s) of adapters other than {sorted(wanted)} ({part.left[0]}"
             f"{', ...' if len(part.left) > 1 else ''}) are left as they are; freeze them, or select their adapter "
             "to train them too")
    return part


def lora_pairs(model: torch.nn.Module, adapter: str | list[str] | None = None) -> list[LoRAPair]:
    """The trainable LoRA pairs of a PEFT model (see :func:`partition`)."""
    return partition(model, adapter).pairs


def create_odelora_optimizer(model: torch.nn.Module, lr: float, *, adapter: str | list[str] | None = None,
                             decay: Collection[str] | None = None, **kwargs) -> ODELoRA:
    """An :class:`~odelora.ODELoRA` for every trainable parameter of a PEFT model (in the style of
    PEFT's ``create_loraplus_optimizer``): the LoRA pairs, found by module with each layer's own
    scaling, follow the flow; everything else that is trainable goes to the AdamW companion
    (``companion_lr``, ``companion_kwargs``). ``decay``: the names (``model.named_parameters()``)
    of the companion's tensors that take its weight decay, the others none (transformers' Trainer
    leaves biases and norms out: ``trainer.get_decay_parameter_names(model)``); default: all.
    Other keyword arguments go to ``ODELoRA``; ``optimizer.partition.summary()`` says which tensor
    went where. ``lr`` (the flow's time step h, in the gradient's units) has no default, as in
    PEFT's helper; the companion's weight decay is AdamW's default 0.01 unless
    ``companion_kwargs`` says otherwise (``ODELoRATrainer`` passes ``args.weight_decay``).

        opt = create_odelora_optimizer(peft_model, lr=0.05, method="rk4", companion_lr=2e-3)
    """
    if "companion" in kwargs:
        raise TypeError("create_odelora_optimizer finds the companion itself (every trainable tensor that is not a LoRA "
                        "factor): leave companion out; freeze a tensor (requires_grad_(False)) to keep it out of training")
    part = partition(model, adapter)
    if not part.pairs:
        if part.unmovable:
            raise ValueError("the model's LoRA layers are embedding, convolution or stacked-expert LoRA, AdaLoRA or a LoRA "
                             "variant other than DoRA (KaSA, BD-LoRA, ...), none a matrix pair B @ A that ODELoRA can move "
                             "(partition(model).others lists them with the reason): train such a model with a torch optimizer "
                             "(AdamW), or add plain LoRA (or DoRA) to its linear layers")
        if any("partner" in why for _, _, why in part.others):
            raise ValueError("every LoRA layer has one factor frozen (LoRA-FA's frozen lora_A, say): ODELoRA moves LoRA "
                             "pairs with both factors trainable, as a product, so there is nothing for it to move. Train "
                             "such a model with a torch optimizer (AdamW), or unfreeze both factors for ODELoRA")
        if part.adapters:
            raise ValueError(f"the model's LoRA adapters ({', '.join(part.adapters)}) have no pair with both factors trainable: "
                             "unfreeze them (model.set_adapter(name) or requires_grad_(True) on lora_A and lora_B)")
        kinds = sorted({str(getattr(c, "peft_type", type(c).__name__)).split(".")[-1]
                        for c in (getattr(model, "peft_config", None) or {}).values()})
        if kinds:
            raise ValueError(f"the model's PEFT adapters are {', '.join(kinds)}, not LoRA: ODELoRA moves the pairs of "
                             "LoraConfig adapters; train these with a torch optimizer (AdamW)")
        raise ValueError("the model has no LoRA layers; wrap it with peft.get_peft_model first (a DeepXDE network: "
                         "odelora.integrations.deepxde.add_lora)")
    companion = [(n, p) for n, p, _ in part.others]  # named: messages name the tensor
    if decay is not None:
        if isinstance(decay, str):
            raise TypeError(f"decay must be a collection of parameter names, got the string {decay!r}: pass [{decay!r}]")
        decay = set(decay)
        companion = [g for g in ({"params": [(n, p) for n, p, _ in part.others if n in decay]},
                                 {"params": [(n, p) for n, p, _ in part.others if n not in decay], "weight_decay": 0.0})
                     if g["params"]]
    opt = ODELoRA(part.pairs, lr=lr, companion=companion, **kwargs)
    opt.partition = part
    return opt
