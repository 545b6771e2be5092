"""uvit.signatures.takes_fields: a callable whose parameters are a frozen dataclass's fields."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Annotated

import pytest

from uvit.signatures import takes_fields


@dataclass(frozen=True)
class Opts:
    name: str
    count: Annotated[int, "meta"] = 2
    tags: tuple[str, ...] = field(default_factory=tuple)


@takes_fields(Opts)
def run(opts: Opts) -> Opts:
    return opts


class Thing:
    @takes_fields(Opts)
    def __init__(self, opts: Opts):
        self.opts = opts


def test_fields_are_the_parameters_positional_or_by_name():
    assert run("a") == Opts("a") and run("a", 3) == Opts("a", 3) and run(name="b", tags=("x",)) == Opts("b", 2, ("x",))
    sig = inspect.signature(run)
    assert list(sig.parameters) == ["name", "count", "tags"]
    assert sig.parameters["count"].default == 2 and sig.parameters["tags"].default == ()
    assert sig.parameters["count"].annotation == Annotated[int, "meta"]  # metadata kept (typer reads it)
    assert sig.parameters["name"].default is inspect.Parameter.empty
    with pytest.raises(TypeError):
        run("a", colour="red")


def test_a_method_keeps_self():
    assert Thing("a", count=5).opts == Opts("a", 5)
    assert list(inspect.signature(Thing.__init__).parameters) == ["self", "name", "count", "tags"]
