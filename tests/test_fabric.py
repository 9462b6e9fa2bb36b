"""Lightning Fabric against the plain loop: bitwise-identical per-step losses, epoch metrics,
loss scales and weights (docs/equivalence.md), through Fabric's own machinery:
Fabric(precision=...), fabric.setup, fabric.setup_dataloaders, fabric.backward,
fabric.clip_gradients, fabric.save and fabric.load."""

import pytest
import torch

from fabric_impl import train as fabric
from plain_torch import train as plain
from tests.conftest import RUNG_OPTIONS, on_gpu, tiny
from tests.test_parity import assert_identical
from record.results import Precision


def both(tmp_path, make=tiny, **overrides):
    a = plain.train(make(tmp_path, run_id="plain", **overrides))
    b = fabric.train(make(tmp_path, run_id="fabric", **overrides))
    assert a.status == b.status == "ok", (a.error, b.error)
    return a, b


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("clip_grad", [0.0, 0.05])
def test_fabric_and_plain_are_bitwise_identical(tmp_path, precision, clip_grad):
    a, b = both(tmp_path, precision=precision, clip_grad=clip_grad)
    assert_identical(a, b)
    assert b.precision == Precision(precision, precision)
    assert len(b.epochs) == 2 and b.impl == "fabric"


def test_identical_when_the_scaler_skips_steps(tmp_path, monkeypatch):
    real = torch.amp.GradScaler.__init__

    def huge_scale(self, *args, **kwargs):
        real(self, *args, **{**kwargs, "init_scale": 2.0**40})

    monkeypatch.setattr(torch.amp.GradScaler, "__init__", huge_scale)
    a, b = both(tmp_path, precision="16-mixed", clip_grad=0.05)
    assert_identical(a, b)
    assert b.epochs[0]["skipped_steps"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize(
    "precision", ["32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true"]
)
def test_fabric_and_plain_bitwise_identical_on_gpu(tmp_path, precision):
    if precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    a, b = both(tmp_path, make=on_gpu, precision=precision, **RUNG_OPTIONS.get(precision, {}))
    assert_identical(a, b)
    assert b.env["device"] == "cuda"
