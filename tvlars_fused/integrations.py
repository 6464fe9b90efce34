"""Hooks into other libraries' optimizer factories (README, "Use it from timm / Transformers / Lightning").

timm: ``register_with_timm()`` adds our optimizers to timm's optimizer registry, after which
``timm.optim.create_optimizer_v2(model, opt="tvlars", lr=..., weight_decay=...)`` builds them with timm's
no-decay parameter groups. timm offers no plugin hook (no entry point is read), so the call is explicit.

Transformers and Lightning need nothing from here: ``Trainer(optimizer_cls_and_kwargs=(LAMB, {...}))`` and a
``configure_optimizers`` that returns our optimizer take the classes as they are.
"""

from __future__ import annotations

from .lamb import LAMB
from .lars import LARS
from .tvlars import TVLARS

# timm's own "lars", "lamb" and "fusedlamb" (apex's FusedLAMB) keep their meaning: our names start with "tv".
# Names cannot contain "_": create_optimizer_v2 reads "lookahead_<name>" by splitting on it.
TIMM_NAMES = {
    "tvlars": (TVLARS, "TVLARS (tvlars_fused): LARS with a time-varying trust-ratio factor phi(t), fused"),
    "tvfusedlars": (LARS, "LARS (tvlars_fused): layer-wise trust ratio, momentum SGD, fused"),
    "tvfusedlamb": (LAMB, "LAMB (tvlars_fused): layer-wise trust ratio on Adam's update, fused"),
}


def register_with_timm(registry=None) -> list[str]:
    """Register ``tvlars``, ``tvfusedlars`` and ``tvfusedlamb`` with timm's optimizer registry (default: the one
    ``timm.optim.create_optimizer_v2`` uses); returns the names. Calling it again changes nothing.

    timm then passes ``lr``, ``weight_decay`` (its parameter groups carry 0 for biases and normalisation weights,
    and the decay for the rest), ``momentum`` (0.9 unless given) to the LARS family and ``betas``/``eps`` to LAMB,
    and any other keyword (``backend``, ``eta``, ``lmbda``, ...) as it is. A name timm already knows for another
    optimizer is refused rather than overwritten."""
    from timm.optim import OptimInfo

    if registry is None:
        from timm.optim._optim_factory import default_registry as registry
    known = set(registry.list_optimizers())
    for name, (cls, description) in TIMM_NAMES.items():
        if name in known:
            if registry.get_optimizer_info(name).opt_class is cls:
                continue
            raise ValueError(f"register_with_timm: timm already registers {name!r} for "
                             f"{registry.get_optimizer_info(name).opt_class!r}; not overwriting it")
        lamb = cls is LAMB
        registry.register(OptimInfo(name=name, opt_class=cls, description=description, has_eps=True,
                                    has_momentum=not lamb, has_betas=lamb))
    return list(TIMM_NAMES)
