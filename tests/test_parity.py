"""Plain PyTorch and Lightning, same seed and options: bitwise-identical per-step losses and
final weights (docs/equivalence.md). Each arm runs through its own framework's machinery:
the plain loop by hand, Lightning through its Trainer, precision plugin and fit loop."""

import pytest
import torch

from common.errors import UsageError
from lightning_impl import train as lightning
from plain_torch import train as plain
from tests import faults
from tests.conftest import RUNG_OPTIONS, on_gpu, tiny
from record.results import Precision


def both(tmp_path, make=tiny, **overrides):
    a = plain.train(make(tmp_path, run_id="plain", **overrides))
    b = lightning.train(make(tmp_path, run_id="lightning", **overrides))
    assert a.status == b.status == "ok", (a.error, b.error)
    return a, b


def assert_identical(a, b):
    assert len(a.step_losses) == len(b.step_losses) > 0
    assert a.step_losses == b.step_losses  # float equality: bitwise for finite values
    assert a.weights_sha256 == b.weights_sha256
    for ra, rb in zip(a.epochs, b.epochs):
        for key in (
            "train_loss",
            "test_loss",
            "test_acc",
            "loss_scale",
            "skipped_steps",
            "steps",
            "saved_tensors",
        ):
            assert ra.get(key) == rb.get(key), key


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_plain_and_lightning_are_bitwise_identical(tmp_path, precision):
    a, b = both(tmp_path, precision=precision)
    assert_identical(a, b)
    assert a.precision == b.precision == Precision(precision, precision)
    assert len(a.epochs) == 2  # the data order of epoch 2 is covered too


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_identical_with_gradient_clipping(tmp_path, precision):
    # plain unscales before clipping; Lightning's precision plugin does it itself.
    a, b = both(tmp_path, precision=precision, clip_grad=0.05)
    assert_identical(a, b)
    unclipped = plain.train(tiny(tmp_path, run_id="unclipped", precision=precision))
    assert unclipped.weights_sha256 != a.weights_sha256  # the clip really bit


def test_identical_with_sgd_and_a_cosine_schedule(tmp_path):
    assert_identical(
        *both(
            tmp_path,
            precision="bf16-mixed",
            optimizer="sgd",
            schedule="cosine",
            lr=0.05,
            epochs=3,
        )
    )


def test_identical_when_the_scaler_skips_steps(tmp_path, monkeypatch):
    # A loss scale of 2**40 overflows fp16 gradients: each arm's GradScaler must skip those
    # steps and back off the scale in the same way.
    real = torch.amp.GradScaler.__init__

    def huge_scale(self, *args, **kwargs):
        real(self, *args, **{**kwargs, "init_scale": 2.0**40})

    monkeypatch.setattr(torch.amp.GradScaler, "__init__", huge_scale)
    a, b = both(tmp_path, precision="16-mixed")
    assert_identical(a, b)
    assert a.epochs[0]["skipped_steps"] > 0
    assert a.epochs[0]["loss_scale"] < 2.0**40


def test_fp16_really_ran_in_lightning_on_cpu(tmp_path):
    fp16 = lightning.train(tiny(tmp_path, run_id="fp16", precision="16-mixed"))
    bf16 = lightning.train(tiny(tmp_path, run_id="bf16", precision="bf16-mixed"))
    assert fp16.precision.effective == "16-mixed"
    assert all(row["loss_scale"] == 65536.0 for row in fp16.epochs)  # a GradScaler ran
    assert all(row["loss_scale"] is None for row in bf16.epochs)
    assert fp16.step_losses != bf16.step_losses


@pytest.mark.parametrize("name", ["Lightning", "Fabric"])
def test_a_silent_switch_to_bf16_is_refused(tmp_path, monkeypatch, name):
    # What Lightning and Fabric do on CPU with precision="16-mixed" and no plugin: run bf16.
    import importlib

    module = importlib.import_module(f"{name.lower()}_impl.train")
    real = module.MixedPrecision
    monkeypatch.setattr(
        module, "MixedPrecision", lambda precision, device, scaler: real("bf16-mixed", device)
    )
    with pytest.raises(UsageError, match=f"{name} chose bf16-mixed for 16-mixed"):
        module.train(tiny(tmp_path, precision="16-mixed"))


@pytest.mark.parametrize("impl", [plain, lightning], ids=["plain", "lightning"])
def test_ctrl_c_leaves_a_complete_result_in_either_loop(tmp_path, monkeypatch, impl):
    import signal

    faults.inject(monkeypatch, epoch=1, action="interrupt")
    handler = signal.getsignal(signal.SIGINT)
    try:
        result = impl.train(tiny(tmp_path, epochs=3))
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after a Ctrl-C
    assert result.status == "interrupted" and result.exit_code == 130
    assert len(result.epochs) == 1 and len(result.step_losses) == 3 and result.weights_sha256


@pytest.mark.gpu
@pytest.mark.parametrize(
    "precision", ["32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true"]
)
def test_plain_and_lightning_bitwise_identical_on_gpu(tmp_path, precision):
    if precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    a, b = both(tmp_path, make=on_gpu, precision=precision, **RUNG_OPTIONS.get(precision, {}))
    assert_identical(a, b)
    assert a.env["device"] == "cuda" and a.env["channels_last"]


def test_identical_in_channels_last(tmp_path):
    a, b = both(tmp_path, precision="bf16-mixed", channels_last=True)
    assert_identical(a, b)
    assert a.env["channels_last"] is True
    default = plain.train(tiny(tmp_path, run_id="default", precision="bf16-mixed"))
    assert default.env["channels_last"] is False  # on CPU it is off unless asked for


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_compiled_arms_stay_bitwise_identical(tmp_path, precision):
    # Each run compiles afresh, as each process does: one process running all three arms
    # would otherwise share dynamo's cache (and its limit of 8 graphs a function). The linear
    # model keeps compiling to seconds; docs/benchmark.md gives the small CNN's figures.
    from fabric_impl import train as fabric

    runs = []
    for arm in (plain, lightning, fabric):
        torch._dynamo.reset()
        runs.append(
            arm.train(
                tiny(
                    tmp_path,
                    run_id=arm.__name__,
                    precision=precision,
                    model="linear",
                    compile=True,
                )
            )
        )
    for run in runs[1:]:
        assert_identical(runs[0], run)
    assert runs[0].env["compile"] is True
