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


def test_the_options_it_reads_are_pytests_own(request):
    # The stand-in above names the options; pytest's real config must have each (getoption raises
    # ValueError for an option it does not know), or a renamed one would make every run "whole".
    for name in Config().options:
        request.config.getoption(name)
