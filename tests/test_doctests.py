"""Every `>>>` example in the package's docstrings runs, in every module (found by walking the package, not chosen by
hand: a module that gains examples is tested without a change here)."""

import doctest
import importlib
import inspect
import pkgutil

import pytest

import prompt2prompt

MODULES = sorted(info.name for info in pkgutil.walk_packages(prompt2prompt.__path__, "prompt2prompt."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    failures, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    runnable = any(">>>" in line and "+SKIP" not in line for line in inspect.getsource(module).splitlines())
    assert failures == 0
    assert attempted > 0 or not runnable  # an example that doctest did not find (one outside a docstring) is no test


def test_the_walk_finds_the_modules_with_examples():
    assert {"prompt2prompt.alignment", "prompt2prompt.families.zimage", "prompt2prompt.recipe"} <= set(MODULES)
