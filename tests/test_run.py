import json
import math
import os
import signal

import pytest
import torch

from common import model_spec, models
from record import files, results
from ampcompare.cli import cli
from click.testing import CliRunner
from plain_torch import train as plain
from tests import faults
from tests.conftest import SMALL_RUN, checkpoint_of, start_until_first_epoch, tiny
from record.results import Precision

RESULT_FIELDS = {
    "schema",
    "run_id",
    "impl",
    "status",
    "error",
    "precision",
    "opt_level",
    "config",
    "env",
    "epochs",
    "step_losses",
    "weights_sha256",
    "summary",
}
ENV_FIELDS = {
    "python",
    "torch",
    "torchvision",
    "lightning",
    "apex",
    "device",
    "device_name",
    "cuda_capability",
    "tensor_cores",
    "cpu_model",
    "threads",
    "git_commit",
}
EPOCH_FIELDS = {
    "epoch",
    "train_loss",
    "test_loss",
    "test_acc",
    "epoch_time_s",
    "images_per_s",
    "data_wait_s",
    "peak_memory_bytes",
    "skipped_steps",
    "loss_scale",
}
SUMMARY_FIELDS = {"median_epoch_time_s", "images_per_s", "peak_memory_bytes", "final_test_acc"}


def load(result):
    cfg_out = result.config["out_dir"]
    with open(os.path.join(cfg_out, result.run_id, "result.json")) as f:
        return json.load(f)


def test_same_seed_same_weights_different_seed_different(tmp_path):
    for name in ("small", "resnet18"):
        a = model_spec.build_model(tiny(tmp_path, model=name, seed=3))
        b = model_spec.build_model(tiny(tmp_path, model=name, seed=3))
        c = model_spec.build_model(tiny(tmp_path, model=name, seed=4))
        assert results.weights_sha256(a) == results.weights_sha256(b)
        assert results.weights_sha256(a) != results.weights_sha256(c)


def test_resnet18_is_the_cifar_variant():
    model = models.ResNet18()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert 11_000_000 < sum(p.numel() for p in model.parameters()) < 11_300_000
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_trained_weights_are_reproducible(tmp_path):
    a = plain.train(tiny(tmp_path, run_id="a"))
    b = plain.train(tiny(tmp_path, run_id="b"))
    c = plain.train(tiny(tmp_path, run_id="c", seed=1))
    assert a.weights_sha256 == b.weights_sha256 and a.step_losses == b.step_losses
    assert c.weights_sha256 != a.weights_sha256


def test_two_epochs_learn_and_write_every_field(tmp_path):
    cfg = tiny(
        tmp_path,
        synthetic_size=3000,
        batch_size=64,
        limit_train_batches=None,
        limit_test_batches=None,
        lr=2e-3,
    )
    result = plain.train(cfg)
    saved = load(result)
    assert set(saved) >= RESULT_FIELDS
    assert set(saved["env"]) >= ENV_FIELDS
    assert all(set(row) >= EPOCH_FIELDS for row in saved["epochs"])
    assert set(saved["summary"]) >= SUMMARY_FIELDS
    assert saved["status"] == "ok" and saved["impl"] == "plain"
    assert saved["precision"] == {"requested": "32-true", "effective": "32-true"}
    assert [row["epoch"] for row in saved["epochs"]] == [0, 1]
    assert len(saved["step_losses"]) == 2 * math.ceil(3000 / 64)
    assert saved["summary"]["final_test_acc"] > 0.5, saved["epochs"]  # chance is 0.1
    assert saved["epochs"][1]["train_loss"] < saved["epochs"][0]["train_loss"]
    assert saved["summary"]["median_epoch_time_s"] == saved["epochs"][1]["epoch_time_s"]
    assert saved["weights_sha256"] == result.weights_sha256
    ckpt = torch.load(
        checkpoint_of(os.path.join(cfg.out_dir, result.run_id)), weights_only=True
    )
    assert set(ckpt) == {"model", "optimizer", "scheduler", "scaler", "ampcompare"}
    assert ckpt["ampcompare"]["epochs"] == saved["epochs"]
    assert saved["checkpoint"]["epochs"] == 2 and saved["weights_epochs"] == 2


def test_precision_alias_is_recorded_canonically(tmp_path):
    result = plain.train(tiny(tmp_path, precision="bf16", epochs=1))
    saved = load(result)
    assert saved["precision"] == {"requested": "bf16-mixed", "effective": "bf16-mixed"}
    assert saved["config"]["precision"] == "bf16-mixed"


def test_auto_precision_on_cpu_is_bf16(tmp_path):
    result = plain.train(tiny(tmp_path, precision="auto", epochs=1))
    assert result.precision == Precision("auto", "bf16-mixed")


def test_interrupted_run_keeps_what_it_measured(tmp_path, monkeypatch):
    faults.inject(monkeypatch, epoch=1, action="interrupt")
    runner = CliRunner()
    out = tmp_path / "runs"
    r = runner.invoke(
        cli,
        [
            "plain",
            "--dataset",
            "synthetic",
            "--model",
            "small",
            "--epochs",
            "3",
            "--synthetic-size",
            "128",
            "--batch-size",
            "32",
            "--quiet",
            "--accelerator",
            "cpu",
            "--precision",
            "32",
            "--out-dir",
            str(out),
            "--run-id",
            "x",
        ],
    )
    assert r.exit_code == 130
    saved = json.loads((out / "x" / "result.json").read_text())
    assert saved["status"] == "interrupted"
    assert [row["epoch"] for row in saved["epochs"]] == [0]
    assert len(saved["step_losses"]) == 4 and saved["weights_sha256"]
    assert checkpoint_of(out / "x").exists()


def test_failed_run_is_recorded_with_its_error(tmp_path, monkeypatch):
    faults.inject(monkeypatch, epoch=1, action="raise")
    result = plain.train(tiny(tmp_path, epochs=3, run_id="f"))
    assert result.status == "failed" and result.exit_code == 1
    assert result.error == "RuntimeError: broken on purpose"
    saved = load(result)
    assert saved["status"] == "failed" and len(saved["epochs"]) == 1
    assert "broken on purpose" in (tmp_path / "runs" / "f" / "error.log").read_text()


def test_divergence_stops_the_run(tmp_path):
    result = plain.train(tiny(tmp_path, lr=1e30, epochs=3, optimizer="sgd"))
    assert result.status == "diverged", result.step_losses
    assert result.exit_code == 1 and len(result.epochs) < 3


def test_existing_run_id_is_a_usage_error(tmp_path):
    plain.train(tiny(tmp_path, run_id="same", epochs=1))
    from common.errors import UsageError

    with pytest.raises(UsageError, match="already exists"):
        plain.train(tiny(tmp_path, run_id="same", epochs=1))


def test_write_json_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    files.write_json(str(path), {"a": 1})
    monkeypatch.setattr(
        json, "dump", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
    )
    with pytest.raises(OSError):
        files.write_json(str(path), {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_loss_is_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(64, 10, requires_grad=True)
    labels = torch.randint(0, 10, (64,))
    ours = models.cross_entropy(logits, labels)
    (grad,) = torch.autograd.grad(ours, logits)
    ref = torch.nn.functional.cross_entropy(logits, labels)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    assert torch.allclose(ours, ref, atol=1e-6) and torch.allclose(grad, ref_grad, atol=1e-6)
    assert torch.allclose(models.cross_entropy(logits, labels, "sum"), ref * 64, rtol=1e-5)
    assert models.cross_entropy(logits.bfloat16(), labels).dtype == torch.float32


def test_no_checkpoint_option(tmp_path):
    result = plain.train(tiny(tmp_path, epochs=1, checkpoint=False, run_id="nock"))
    assert result.status == "ok" and result.weights_sha256
    assert sorted(p.name for p in (tmp_path / "runs" / "nock").iterdir()) == [
        ".lock",
        "result.json",
    ]


def test_sigterm_ends_a_run_like_ctrl_c(tmp_path):
    out = tmp_path / "runs"
    proc, path = start_until_first_epoch(
        [
            "plain",
            *SMALL_RUN,
            "--epochs",
            "200",
            "--precision",
            "32",
            "--out-dir",
            str(out),
            "--run-id",
            "t",
            "--quiet",
        ],
        out,
        "t/result.json",
    )
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    saved = json.loads(path.read_text())
    assert saved["status"] == "interrupted" and 0 < len(saved["epochs"]) < 200
    assert checkpoint_of(out / "t").exists()
