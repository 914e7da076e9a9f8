"""Registry of per-layer capture rules, keyed by module type (as opacus does for per-sample gradients).

Lookup walks the module's class hierarchy, so a subclass of ``nn.Linear`` gets the Linear rule. A key may be a class or
a dotted class path (``"transformers.pytorch_utils.Conv1D"``), which lets us support optional libraries without
importing them. Registering the same key twice raises.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from .pieces import Piece


class LayerRule:
    """Everything datacredit knows about one kind of layer.

    Subclasses implement :meth:`pieces`: the factored per-example gradients of the module's trainable parameters for
    one call, given the call's inputs (batch first) and the gradient of the per-example losses w.r.t. its output.
    """

    name: str = "rule"

    def pieces(self, module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor) -> dict[str, Piece]:
        """Map parameter attribute name (``"weight"``, ``"bias"``) to its piece; only parameters needing grad."""
        raise NotImplementedError

    def check(self, module: nn.Module, path: str) -> None:
        """Raise :class:`UnsupportedModuleError` for configurations the rule cannot handle (called once)."""


_RULES: dict[type | str, LayerRule] = {}


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


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule of the nearest registered class in ``type(module).__mro__``, or None."""
    for cls in type(module).__mro__:
        rule = _RULES.get(cls) or _RULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            return rule
    return None


def registered() -> dict[type | str, str]:
    """Every registered key and the name of its rule."""
    return {key: rule.name for key, rule in _RULES.items()}
