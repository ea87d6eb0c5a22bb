"""Shared test set-up: each fixture family lives in its own module, registered here."""
pytest_plugins = [
    "tests.fixtures_models",
    "tests.fixtures_s3",
    "tests.fixtures_http",
    "tests.fixtures_whisper",
    "tests.fixtures_worker",
    "tests.fixtures_api",
]
