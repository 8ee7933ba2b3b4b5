"""Every docstring example in the package runs and prints what it says (`>>>` lines)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import fastadapt

MODULES = sorted(info.name for info in pkgutil.walk_packages(fastadapt.__path__, "fastadapt."))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_hold(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, verbose=False, report=True)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (printed above)"
