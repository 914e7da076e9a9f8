"""Registry of per-layer capture rules, keyed by module type (as opacus does for per-sample gradients).

A rule implements one forward, so it matches only modules that run that forward (DESIGN.md, "Capture engine"):

* the registered class itself;
* a subclass that only changes construction: it defines no method other than ``__init__``, ``reset_parameters`` and
  ``extra_repr`` (no ``forward``, no ``_conv_forward``, no property), e.g. torch's ``NonDynamicallyQuantizableLinear``.

In both cases the module's own trainable parameters must be among those the rule knows (``LayerRule.params``): a
parameter the rule does not know (``weight_g`` of an old-style weight norm, a learned ``scale``) would get no gradient.
Anything else is refused by :func:`rule_mismatch` with the reason, so the engine never applies a rule to a forward it
does not implement (a subclass of ``nn.Linear`` multiplying by a learned scale was off by 75 % with the Linear rule).
A key may be a class or a dotted class path (``"transformers.pytorch_utils.Conv1D"``), which lets us support optional
libraries without importing them. Registering the same key twice raises.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from .pieces import Piece


class LayerRule:
    """Everything datacredit knows about one kind of layer.

    Subclasses implement :meth:`pieces`: the factored per-example gradients of the module's trainable parameters for
    one call, given the call's inputs (batch first) and the gradient of the per-example losses w.r.t. its output.
    ``params``: the names of the module's own parameters the rule gives gradients for (``None``: not checked).
    """

    name: str = "rule"
    params: tuple[str, ...] | None = None

    def pieces(self, module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor) -> dict[str, Piece]:
        """Map parameter attribute name (``"weight"``, ``"bias"``) to its piece; only parameters needing grad.

        A rule whose :meth:`saved` returns something other than None also receives it as ``saved=``."""
        raise NotImplementedError

    def saved(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> object | None:
        """What the rule wants to keep from the forward call besides its inputs (called in the forward hook), e.g.
        statistics autograd saved for its own backward, so :meth:`pieces` need not recompute them. Default: None."""
        return None

    def check(self, module: nn.Module, path: str) -> None:
        """Raise :class:`UnsupportedModuleError` for configurations the rule cannot handle (called once)."""


_RULES: dict[type | str, LayerRule] = {}

# Class attributes a subclass may define and still run its base class's forward unchanged.
_CONSTRUCTION_ONLY = frozenset({
    "__module__", "__qualname__", "__doc__", "__annotations__", "__constants__", "__init__", "reset_parameters",
    "extra_repr", "__firstlineno__", "__static_attributes__", "__dict__", "__weakref__", "__parameters__",
    "__orig_bases__", "__type_params__", "__annotate__", "__annotate_func__", "__annotations_cache__",
})


def register(*keys: type | str) -> Callable[[type[LayerRule]], type[LayerRule]]:
    """Class decorator: register a rule for module classes (or dotted class paths). Duplicates raise."""

    def wrap(cls: type[LayerRule]) -> type[LayerRule]:
        rule = cls()
        for key in keys:
            if key in _RULES:
                raise ValueError(f"a capture rule for {key!r} is already registered ({_RULES[key].name})")
            _RULES[key] = rule
        return cls

    return wrap


def _registered(cls: type) -> LayerRule | None:
    return _RULES.get(cls) or _RULES.get(f"{cls.__module__}.{cls.__qualname__}")


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _nearest(module: nn.Module) -> tuple[type, LayerRule, list[type]] | None:
    """The nearest registered class in the MRO, its rule, and the subclasses between the module's type and it."""
    mro = type(module).__mro__
    for k, cls in enumerate(mro):
        rule = _registered(cls)
        if rule is not None:
            return cls, rule, list(mro[:k])
    return None


def _overrides(cls: type) -> list[str]:
    """Names ``cls`` defines that can change what the forward computes (methods, properties, descriptors)."""
    return sorted(name for name, value in vars(cls).items()
                  if name not in _CONSTRUCTION_ONLY and (callable(value) or hasattr(value, "__get__")))


def rule_mismatch(module: nn.Module) -> str | None:
    """Why the nearest registered rule does not fit ``module`` (a sentence), or None when it fits or none exists."""
    found = _nearest(module)
    if found is None:
        return None
    base, rule, between = found
    for cls in between:
        changed = _overrides(cls)
        if changed:
            return (f"it subclasses {_qualname(base)} but {cls.__qualname__} defines {changed}, so the "
                    f"{rule.name!r} rule (written for {base.__qualname__}.forward) may not match what it computes")
    if rule.params is not None:
        extra = sorted(n for n, p in module.named_parameters(recurse=False) if p.requires_grad and n not in rule.params)
        if extra:
            return (f"it has trainable parameters {extra} that the {rule.name!r} rule (for {_qualname(base)}: "
                    f"{list(rule.params)}) gives no gradient for")
    return None


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule whose forward ``module`` runs (see the module docstring), or None."""
    found = _nearest(module)
    if found is None or rule_mismatch(module) is not None:
        return None
    return found[1]


def registered() -> dict[type | str, str]:
    """Every registered key and the name of its rule."""
    return {key: rule.name for key, rule in _RULES.items()}
