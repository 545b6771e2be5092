"""A function whose parameters are declared once, as the fields of a frozen dataclass.

Some frameworks read the parameter list off a callable's signature: typer makes one command-line
option per parameter, diffusers' `ConfigMixin` records one config key per `__init__` parameter,
and diffusers pipelines are called with flat keyword arguments. `takes_fields(Options)` lets such a
callable be written as `f(options)` (or `f(self, options)`) while callers, `help()` and the
framework see and pass `Options`' fields, with their types and defaults:

    @takes_fields(GenerateOptions)
    def generate(options: GenerateOptions) -> None: ...

    generate(source, num=4)   # == generate(GenerateOptions(source, num=4))
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Any, Callable, TypeVar

__all__ = ["takes_fields"]

F = TypeVar("F", bound=Callable[..., Any])


def _parameters(options: type) -> list[inspect.Parameter]:
    """One parameter per init field of the dataclass `options`, in order, with its (resolved,
    Annotated metadata kept) type and its default."""
    hints = typing.get_type_hints(options, include_extras=True)
    out = []
    for f in dataclasses.fields(options):
        if not f.init:
            continue
        default = f.default
        if default is dataclasses.MISSING:
            default = inspect.Parameter.empty if f.default_factory is dataclasses.MISSING else f.default_factory()
        out.append(
            inspect.Parameter(
                f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=hints[f.name]
            )
        )
    return out


def takes_fields(options: type) -> Callable[[F], F]:
    """Decorate `fn(options)` or the method `fn(self, options)`: the result takes the fields of the
    dataclass `options` (positionally in field order or by name), builds one `options(...)` from them
    and calls `fn` with it. Its `__signature__` and `__annotations__` list the fields."""
    params = _parameters(options)

    def decorate(fn: F) -> F:
        is_method = next(iter(inspect.signature(fn).parameters), None) == "self"
        if is_method:

            @functools.wraps(fn)
            def wrapper(self, *args, **kwargs):
                return fn(self, options(*args, **kwargs))

            first = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        else:

            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                return fn(options(*args, **kwargs))

            first = []
        returns = inspect.signature(fn).return_annotation
        wrapper.__signature__ = inspect.Signature(first + params, return_annotation=returns)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper  # type: ignore[return-value]

    return decorate
