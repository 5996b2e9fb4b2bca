"""The explanation methods :func:`segx_helpers.explain.api.explain` knows, by name.

A method is an :class:`ExplanationMethod`: its name, its options dataclass, a function computing one map
per (image, class) pair, and optionally a fast engine. Adding one is a module with that function and one
:func:`register_method` call, e.g. a map that is the mean absolute input over channels::

    @dataclass(frozen=True)
    class InputOptions:
        pass

    def input_maps(model, images, targets, options, settings):
        return np.stack([images[i].abs().mean(0).numpy() for i, row in enumerate(targets) for _ in row])

    register_method(ExplanationMethod("input", InputOptions, input_maps))

after which ``explain(model, images, targets, "input")`` computes it. The built-in methods register
themselves in :mod:`segx_helpers.explain.cams` and :mod:`segx_helpers.explain.gradient_shap`, which
:mod:`segx_helpers.explain.api` imports.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from segx_helpers.explain.targets import Engine, MapsFunction


@dataclass(frozen=True)
class ExplanationMethod:
    """One explanation method.

    ``name``: what ``explain(..., method=name)`` takes. ``options``: the dataclass of its own settings;
    ``explain(..., options=None)`` uses ``options()`` (its defaults). ``maps``: the reference computation, a
    :data:`~segx_helpers.explain.targets.MapsFunction` (one map ``(M, H, W)`` per (image, class) pair).
    ``fast``: an optional :data:`~segx_helpers.explain.targets.Engine`, what ``RunOptions(engine="fast")`` (and
    ``"auto"``) runs; wrap a maps function with :func:`~segx_helpers.explain.targets.explain_pairs` when
    the speed-up needs nothing else. ``prepare``: optional ``prepare(options, model, images) -> options``,
    the options checked and completed for this model and these images (``(N, C, H, W)``) before
    explaining. ``zero_maps_hint``: what to check first when every map comes out zero, in the warning.
    """

    name: str
    options: type
    maps: MapsFunction
    fast: Engine | None = None
    prepare: Callable[[Any, nn.Module, torch.Tensor], Any] | None = None
    zero_maps_hint: str = ""


_METHODS: dict[str, ExplanationMethod] = {}


def register_method(method: ExplanationMethod) -> ExplanationMethod:
    """Make ``method`` available to ``explain`` under ``method.name``; returns it. A name that is already
    registered is refused (:func:`unregister_method` it first)."""
    if method.name in _METHODS:
        raise ValueError(f"an explanation method named {method.name!r} is already registered; choose another name "
                         f"or unregister_method({method.name!r}) first")
    _METHODS[method.name] = method
    return method


def unregister_method(name: str) -> ExplanationMethod:
    """Remove the method registered as ``name`` (e.g. at the end of a test) and return it."""
    get_method(name)
    return _METHODS.pop(name)


def get_method(name: str) -> ExplanationMethod:
    """The method registered as ``name``; an unknown name is a ``ValueError`` listing the registered ones."""
    if name not in _METHODS:
        raise ValueError(f"Unknown method {name!r}; choose one of the registered methods {method_names()}")
    return _METHODS[name]


def method_names() -> tuple[str, ...]:
    """The registered methods' names, in registration order."""
    return tuple(_METHODS)
