"""Shared test set-up: each fixture family lives in its own module, registered here."""
import pytest

# The shared helpers assert too; rewritten as test modules are, so a failing one shows its values.
pytest.register_assert_rewrite("tests.helpers")

pytest_plugins = [
    "tests.fixtures_models",
    "tests.fixtures_s3",
    "tests.fixtures_http",
    "tests.fixtures_whisper",
    "tests.fixtures_worker",
    "tests.fixtures_api",
]
