"""Only a run of every collected test rewrites tests/RELIABILITY.md (a selection's figures are partial)."""
from __future__ import annotations

import pytest

from tests.reliability_report import whole_run


class Config:
    """The two things ``whole_run`` reads of pytest's config, as a command line would set them."""

    def __init__(self, args=("tests",), **options):
        self.args = list(args)
        self.options = {"keyword": "", "markexpr": "", "deselect": None, **options}

    def getoption(self, name):
        return self.options[name]


@pytest.mark.parametrize("config, whole", [
    (Config(), True),
    (Config(["tests/test_reliability_faults.py"]), True),
    (Config(keyword="cjk"), False),
    (Config(markexpr="slow"), False),
    (Config(deselect=["tests/test_reliability_faults.py::test_settings_at_and_past_their_limits"]), False),
    (Config(["tests/test_reliability_faults.py::test_settings_at_and_past_their_limits"]), False),
])
def test_a_selection_is_not_a_whole_run(config, whole):
    assert whole_run(config) is whole


def test_this_run_is_read_from_pytests_own_config(request):
    # Whatever selected this test, the answer comes from the real config without error.
    assert whole_run(request.config) in (True, False)
