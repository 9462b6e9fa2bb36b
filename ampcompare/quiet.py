"""The frameworks' own chatter, quieted in one place, by the command line (and the bench) once
their modules are imported (Lightning sets its loggers' level as it is imported); the arms
themselves never touch logging or warning filters.

What goes: Lightning's and Fabric's start-up banners (accelerator availability, logger tips,
"Using bfloat16 Automatic Mixed Precision", "max_epochs reached": the record says all of it),
a deprecation inside Lightning's own pytree helper, Accelerate's note that it set the threads,
and torch's warning that the LR scheduler stepped before the optimizer, which a GradScaler that
skips its first steps by design triggers. Nothing a user of this tool can act on.
"""

from __future__ import annotations

import logging
import warnings

LOGGERS = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")
MESSAGES = (
    r".*isinstance\(treespec, LeafSpec\)",
    r"Detected call of `lr_scheduler\.step\(\)` before",
    r"OMP_NUM_THREADS/MKL_NUM_THREADS unset",
)


def frameworks() -> None:
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in MESSAGES:
        warnings.filterwarnings("ignore", message=message)
