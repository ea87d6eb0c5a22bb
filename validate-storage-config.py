#!/usr/bin/env python3
"""Check the worker's storage configuration before deploying: ``python validate-storage-config.py --help``.

The checks live in ``f5worker.validation`` (importable and tested); this file only sets up logging
and makes the repository importable from any working directory.
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from f5worker.validation import INTERRUPTED, main  # noqa: E402 - needs the path above

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    code = main(sys.argv[1:])
    if code == INTERRUPTED:  # Ctrl-C: threads left in a storage call must not abort the exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
