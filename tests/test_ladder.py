"""The true rungs of the precision ladder: at bf16-true and 16-true the model itself is in the
half type (no fp32 copy), and every arm gets there as its users write it (plain and Accelerate
cast the model and the inputs; Lightning and Fabric take the precision string). The four arms
train bitwise alike, in one process and through a stop and resume; 16-true with Adam diverges
in every arm alike (Adam's eps of 1e-8 is 0 in fp16) and the record says where."""

import pytest
import torch

from accelerate_impl import train as accelerate
from fabric_impl import train as fabric
from lightning_impl import train as lightning
from plain_torch import train as plain
from record.results import Precision
from tests import faults
from tests.conftest import RUNG_OPTIONS, checkpoint_of, tiny

ARMS = {"plain": plain, "lightning": lightning, "fabric": fabric, "accelerate": accelerate}
# 16-true trains with SGD here: with Adam it diverges (below)
SETTINGS = {"bf16-true": {}, **RUNG_OPTIONS}


def every_arm(tmp_path, precision, **overrides):
    runs = {}
    for name, arm in ARMS.items():
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)  # one Accelerator per run, as a process has it
        runs[name] = arm.train(tiny(tmp_path, run_id=name, precision=precision, **overrides))
    return runs


@pytest.mark.parametrize("precision", list(SETTINGS))
def test_every_arm_trains_a_true_rung_bitwise_alike(tmp_path, precision):
    runs = every_arm(tmp_path, precision, **SETTINGS[precision])
    base = runs["plain"]
    assert base.status == "ok" and len(base.step_losses) == 6
    for name, run in runs.items():
        assert run.status == "ok", (name, run.error)
        assert run.precision == Precision(precision, precision)
        assert run.step_losses == base.step_losses, name
        assert run.weights_sha256 == base.weights_sha256, name
    # the weights really are half: plain's checkpoint holds them in the rung's type
    state = torch.load(checkpoint_of(tmp_path / "runs" / "plain"), weights_only=True)
    half = torch.bfloat16 if precision == "bf16-true" else torch.float16
    assert {t.dtype for t in state["model"].values() if t.is_floating_point()} == {half}
    mixed = plain.train(tiny(tmp_path, run_id="mixed", precision="bf16-mixed"))
    assert mixed.step_losses != base.step_losses  # not the mixed rung under another name


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("arm", list(ARMS))
@pytest.mark.parametrize("precision", list(SETTINGS))
def test_a_true_rung_stopped_and_resumed_is_bitwise_a_straight_run(
    tmp_path, monkeypatch, arm, precision
):
    options = dict(precision=precision, **SETTINGS[precision])
    straight = ARMS[arm].train(tiny(tmp_path, run_id="straight", **options))
    with monkeypatch.context() as m:
        faults.inject(m, epoch=1, action="interrupt", step=2)
        stopped = ARMS[arm].train(tiny(tmp_path, run_id="stopped", **options))
    assert stopped.status == "interrupted"
    if arm == "accelerate":
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)
    resumed = ARMS[arm].train(
        tiny(tmp_path, run_id="stopped", resume=str(tmp_path / "runs" / "stopped"), **options)
    )
    assert straight.status == resumed.status == "ok", resumed.error
    assert resumed.step_losses == straight.step_losses
    assert resumed.weights_sha256 == straight.weights_sha256


def test_16_true_with_adam_diverges_in_every_arm_alike_and_says_where(tmp_path):
    runs = every_arm(tmp_path, "16-true")
    errors = {name: run.error for name, run in runs.items()}
    assert {run.status for run in runs.values()} == {"diverged"}, errors
    assert len(set(errors.values())) == 1, errors  # the same step in every arm
    assert errors["plain"].startswith("loss is nan from step 2 of epoch 0"), errors
    assert runs["plain"].exit_code == 1 and runs["plain"].weights_sha256 is None


def test_a_backend_without_half_collectives_is_refused_in_one_line(monkeypatch):
    from common import distributed
    from common.errors import Unavailable

    def no_bf16(tensor, *args, **kwargs):
        raise RuntimeError("Invalid scalar type\nmore lines of the backend's own")

    monkeypatch.setattr(distributed.dist, "all_reduce", no_bf16)
    world = distributed.World(0, 0, 2, 2, "gloo")
    with pytest.raises(Unavailable) as e:
        distributed.check_reduces(world, torch.bfloat16, torch.device("cpu"))
    assert str(e.value).startswith("the gloo backend cannot all-reduce torch.bfloat16 tensors")
    assert "\n" not in str(e.value) and "(Invalid scalar type)" in str(e.value)
    distributed.check_reduces(world, None, torch.device("cpu"))  # a mixed rung: nothing to try


LINEAR = 3072 * 10 + 10  # the linear model's weights and biases


@pytest.mark.parametrize(
    "precision,width", [("32-true", 4), ("bf16-mixed", 4), ("bf16-true", 2), ("16-true", 2)]
)
def test_the_model_state_is_counted_from_its_tensors(tmp_path, precision, width):
    # Adam's two moments are the parameters' size, plus a 4-byte step count per parameter
    # tensor; a mixed rung keeps all of it in fp32, a true rung all of it in the half type.
    options = dict(model="linear", precision=precision, **SETTINGS.get(precision, {}))
    run = plain.train(tiny(tmp_path, run_id="r", **options))
    state = run.epochs[-1]["model_state"]
    sgd = options.get("optimizer") == "sgd"  # momentum: one buffer the parameters' size
    assert state == {
        "parameters": width * LINEAR,
        "gradients": width * LINEAR,
        "optimizer": width * LINEAR * (1 if sgd else 2) + (0 if sgd else 2 * 4),
        "master": 0,
        "scaler": 0,
    }
    assert run.summary["parameter_bytes"] == width * LINEAR
    assert run.summary["model_state_bytes"] == sum(state.values())


def test_every_arm_counts_the_same_state_and_the_scaler_at_16_mixed(tmp_path):
    runs = every_arm(tmp_path, "bf16-true", model="linear")
    assert len({str(r.epochs[-1]["model_state"]) for r in runs.values()}) == 1
    fp16 = plain.train(tiny(tmp_path, run_id="fp16", model="linear", precision="16-mixed"))
    assert fp16.epochs[-1]["model_state"]["scaler"] == 8  # its scale and growth tracker


def test_master_weights_are_what_the_optimizer_holds_beside_the_model():
    from common import model_state

    model = torch.nn.Linear(4, 2).half()  # apex O2's shape: an fp16 model, fp32 masters
    masters = [p.detach().float().requires_grad_() for p in model.parameters()]
    optimizer = torch.optim.SGD(masters, lr=0.1)
    for p in masters:
        p.grad = torch.zeros_like(p)
    parts = model_state.bytes_of(model, optimizer)
    assert parts["parameters"] == 2 * (4 * 2 + 2) and parts["master"] == 2 * 4 * (4 * 2 + 2)
    assert parts["gradients"] == 0 and parts["optimizer"] == 0


def test_compare_reports_each_rungs_model_state_against_32_true(tmp_path):
    from click.testing import CliRunner

    from ampcompare.cli import cli
    from tests.conftest import ARMS_ONLY, SMALL_RUN

    result = CliRunner().invoke(
        cli,
        [
            "compare",
            *SMALL_RUN,
            "--epochs",
            "1",
            "--limit-train-batches",
            "2",
            "--impls",
            "plain",
            "--precisions",
            "32-true,bf16-mixed,bf16-true",
            *ARMS_ONLY,
            "--out-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    (folder,) = tmp_path.iterdir()
    text = (folder / "report.md").read_text()
    table = text[text.index("### Model state against 32-true") :].split("\n\n")[1]
    rows = {line.split(" | ")[1]: line for line in table.splitlines()[2:]}
    # parameters, gradients, optimizer state, master weights, scaler, all of it
    assert rows["bf16-mixed"].endswith("| 1.00× | 1.00× | 1.00× | – | – | 1.00× |")
    assert rows["bf16-true"].endswith("| 0.50× | 0.50× | 0.50× | – | – | 0.50× |")
