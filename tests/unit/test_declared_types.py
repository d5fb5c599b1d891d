"""Output types declared to spare a job's build Beam's inference (``transforms.declared_types``) are
the ones the inference finds: the steps' outputs, and their coders, are what they would have been."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import apache_beam as beam
import pytest
from apache_beam.typehints import typehints

import transforms


def _declared_any_output() -> list[type]:
    """Every DoFn class of ``transforms``, subclasses too, whose output type is declared ``Any``."""
    found = set()
    for module_info in pkgutil.iter_modules(transforms.__path__):
        module = importlib.import_module(f"transforms.{module_info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            hints = getattr(cls, "_type_hints", None)
            if issubclass(cls, beam.DoFn) and hints is not None and hints.output_types == ((typehints.Any,), {}):
                found.add(cls)
    return sorted(found, key=lambda cls: cls.__qualname__)


DECLARED = _declared_any_output()


def test_the_steps_that_took_the_longest_to_infer_are_declared():
    names = {cls.__name__ for cls in DECLARED}
    assert {"CloseHourFn", "PublishWhenWrittenFn", "GatherPanesFn"} <= names, names


@pytest.mark.parametrize("dofn_class", DECLARED, ids=lambda cls: cls.__name__)
def test_a_declared_output_type_is_what_beam_would_infer(dofn_class):
    undeclared = object.__new__(dofn_class)  # inference reads ``process``'s bytecode; no instance state
    assert beam.DoFn.infer_output_type(undeclared, typehints.Any) == typehints.Any
