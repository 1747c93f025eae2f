import doctest

import pytest

from prompt2prompt import alignment, files, forms, schedules, visualize
from prompt2prompt.batch import manifest


@pytest.mark.parametrize("module", [alignment, files, forms, manifest, schedules, visualize], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    failures, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert attempted > 0 and failures == 0
