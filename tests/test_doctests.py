import doctest

import pytest

from prompt2prompt import alignment, edits, files, limits, schedules, visualize
from prompt2prompt.batch import manifest
from prompt2prompt.bench import attributes, pie
from prompt2prompt.families import defaults, mmdit, zimage


@pytest.mark.parametrize("module", [alignment, attributes, defaults, edits, files, limits, manifest, mmdit, pie,
                                    schedules, visualize, zimage], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    failures, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert attempted > 0 and failures == 0
