# Loaded at start-up by the child processes of a test that put this folder on PYTHONPATH.
import os
import sys

if os.environ.get("AMPCOMPARE_TEST_FAULT"):
    from tests import faults

    faults.install_from_env()

if os.environ.get("AMPCOMPARE_TEST_ACCELERATE_FSDP_ON_CPU") and "accelerate" in sys.argv:
    from tests import faults

    faults.accelerate_shards_on_cpu()
