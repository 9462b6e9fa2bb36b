# Loaded at start-up by the child processes of a test that put this folder on PYTHONPATH.
import os

if os.environ.get("AMPCOMPARE_TEST_FAULT"):
    from tests import faults

    faults.install_from_env()
