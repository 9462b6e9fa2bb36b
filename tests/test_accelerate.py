"""Hugging Face Accelerate against the plain loop: bitwise-identical per-step losses, epoch
metrics and weights at 32-true and bf16-mixed, with and without clipping, through a stop and
resume, through Accelerate's own machinery: Accelerator(mixed_precision=...), prepare,
backward, clip_grad_norm_. On a CPU it trains fp32 when asked for fp16, so 16-mixed is refused
there; the proof that it would have is here too, so that the refusal goes when that changes."""

import pytest
import torch
from click.testing import CliRunner

from accelerate_impl import precision as accelerate_precision
from accelerate_impl import train as accelerate
from ampcompare.cli import cli
from common.errors import Unavailable
from plain_torch import train as plain
from tests.conftest import RUNG_OPTIONS, on_gpu, tiny
from tests.test_parity import assert_identical
from record.results import Precision


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def both(tmp_path, make=tiny, **overrides):
    a = plain.train(make(tmp_path, run_id="plain", **overrides))
    b = accelerate.train(make(tmp_path, run_id="accelerate", **overrides))
    assert a.status == b.status == "ok", (a.error, b.error)
    return a, b


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("clip_grad", [0.0, 0.05])
def test_accelerate_and_plain_are_bitwise_identical(tmp_path, precision, clip_grad):
    a, b = both(tmp_path, precision=precision, clip_grad=clip_grad, epochs=3)
    assert_identical(a, b)
    assert b.precision == Precision(precision, precision)
    assert len(b.epochs) == 3 and b.impl == "accelerate" and b.env["accelerate"]
    assert len(b.epochs[1]["step_times_s"]) == b.epochs[1]["steps"]


def test_identical_with_a_cosine_schedule(tmp_path):
    # Accelerate steps a prepared schedule its own way by default; the arm asks for plain's.
    a, b = both(tmp_path, precision="bf16-mixed", optimizer="sgd", schedule="cosine")
    assert_identical(a, b)


def test_16_mixed_on_a_cpu_is_refused_in_one_line(tmp_path):
    r = CliRunner().invoke(
        cli,
        [
            "accelerate",
            "--dataset",
            "synthetic",
            "--model",
            "small",
            "--synthetic-size",
            "64",
            "--batch-size",
            "4",
            "--epochs",
            "1",
            "--accelerator",
            "cpu",
            "--precision",
            "16",
            "--out-dir",
            str(tmp_path / "out"),
        ],
    )
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and lines == [
        "ampcompare: error: Accelerate would run 32-true for 16-mixed on cpu (native_amp "
        "False, GradScaler none); refusing to record the wrong one"
    ], r.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(Unavailable, match="Accelerate would run 32-true for 16-mixed"):
        accelerate.train(tiny(tmp_path, precision="16-mixed"))


def test_asked_for_fp16_on_a_cpu_accelerate_trains_fp32(tmp_path):
    # What the refusal rests on, measured: no autocast, no scaler, and weights after a few
    # steps bitwise those of plain fp32 steps. If a later Accelerate runs fp16 here, this
    # fails, and the refusal (which reads the state back) goes by itself.
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    assert accelerator.native_amp is False and accelerator.scaler is None
    assert accelerate_precision.runs(accelerator) == "32-true"

    def steps(wrap):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model, optimizer, backward = wrap(model, optimizer)
        dtypes = set()
        model.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
            optimizer.zero_grad()
            backward(torch.nn.functional.cross_entropy(model(x), y))
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()], dtypes

    def accelerated(model, optimizer):
        model, optimizer = accelerator.prepare(model, optimizer)
        return model, optimizer, accelerator.backward

    fp16, dtypes = steps(accelerated)
    fp32, _ = steps(lambda m, o: (m, o, lambda loss: loss.backward()))
    assert dtypes == {torch.float32}
    assert all(torch.equal(a, b) for a, b in zip(fp16, fp32))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "precision", ["32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true"]
)
def test_accelerate_and_plain_bitwise_identical_on_gpu(tmp_path, precision):
    if precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    a, b = both(
        tmp_path,
        make=on_gpu,
        precision=precision,
        **RUNG_OPTIONS.get(precision, {}),
        clip_grad=0.05,
    )
    assert_identical(a, b)
    assert b.env["device"] == "cuda"
