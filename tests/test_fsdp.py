"""Sharded data parallel (--strategy fsdp: torch's FSDP2) on torch.distributed, 2 processes,
gloo, CPU: the plain loop, Lightning's ModelParallelStrategy and Fabric's give bitwise-identical
per-step losses and full weights at every rung they share; plain FSDP gives plain DDP's at
32-true, with half the model state per rank; a stopped job resumes bitwise in every arm; and
what a framework cannot do is refused in one line. Jobs run as test_ddp.py's do: through the
command line, each rank a process of its own, under a time limit."""

import json

import pytest
import torch
from click.testing import CliRunner

from ampcompare.cli import cli
from common import models, sharding
from tests import faults
from tests.conftest import run_cli
from tests.test_ddp import LIMIT, gone, job

ARMS = ("plain", "lightning", "fabric")
FSDP = ("--strategy", "fsdp")


def assert_identical(runs: dict) -> None:
    plain = runs["plain"]
    assert len(plain["step_losses"]) == 6
    for arm, record in runs.items():
        assert record["status"] == "ok", (arm, record["error"])
        assert record["config"]["strategy"] == "fsdp" and record["env"]["world_size"] == 2
        assert gone(record["env"]["pids"])
        assert record["step_losses"] == plain["step_losses"], arm
        assert record["weights_sha256"] == plain["weights_sha256"], arm
        for a, b in zip(record["epochs"], plain["epochs"]):
            assert (a["test_loss"], a["test_acc"]) == (b["test_loss"], b["test_acc"]), arm
            assert a["model_state"] == b["model_state"], arm


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_plain_lightning_and_fabric_fsdp_are_bitwise_identical(tmp_path, precision):
    runs = {
        arm: job(arm, tmp_path, arm, *FSDP, "--precision", precision, "--epochs", "2")
        for arm in ARMS
    }
    assert_identical(runs)


def test_fsdp_is_ddp_at_32_true_with_half_the_state_per_rank(tmp_path):
    ddp = job("plain", tmp_path, "ddp", "--precision", "32", "--epochs", "2")
    runs = {
        arm: job(arm, tmp_path, arm, *FSDP, "--precision", "32", "--epochs", "2")
        for arm in ARMS
    }
    assert_identical(runs)
    assert runs["plain"]["step_losses"] == ddp["step_losses"]
    assert runs["plain"]["weights_sha256"] == ddp["weights_sha256"]
    sharded, whole = runs["plain"]["epochs"][-1], ddp["epochs"][-1]
    for part in ("parameters", "gradients", "optimizer"):
        # Each rank keeps its shard: half, give or take the padding of an odd-sized tensor.
        assert 0.45 < sharded["model_state"][part] / whole["model_state"][part] <= 0.55, part


def test_fsdps_mixed_precision_is_identical_across_arms_and_resumes_bitwise(
    tmp_path, monkeypatch
):
    """bf16-fsdp (MixedPrecisionPolicy, the norm layers kept fp32): every arm the same, and
    each arm's job, stopped mid-epoch, resumes from its gathered checkpoint to the same."""
    args = (*FSDP, "--precision", "bf16-fsdp", "--epochs", "2")
    runs = {arm: job(arm, tmp_path, arm, *args) for arm in ARMS}
    assert_identical(runs)
    faults.inject_children(monkeypatch, epoch=1, action="interrupt", step=2)
    for arm in ARMS:
        stopped = job(arm, tmp_path, f"{arm}-stopped", *args, expect=130)
        assert stopped["status"] == "interrupted" and stopped["checkpoint"]["epochs"] == 1
    monkeypatch.delenv(faults.ENV)
    for arm in ARMS:
        folder = tmp_path / f"{arm}-stopped"
        proc = run_cli([arm, "--resume", str(folder), "--quiet"], timeout=LIMIT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        resumed = json.loads((folder / "result.json").read_text())
        assert resumed["status"] == "ok" and resumed["config"]["strategy"] == "fsdp"
        assert resumed["step_losses"] == runs[arm]["step_losses"], arm
        assert resumed["weights_sha256"] == runs[arm]["weights_sha256"], arm


REFUSED = [
    (["apex"], "apex: --strategy fsdp: apex.amp predates sharded data parallel"),
    (["accelerate"], "accelerate: --strategy fsdp: Accelerate never turns FSDP on for a CPU"),
    (
        ["lightning", "--precision", "16-mixed"],
        "lightning: --strategy fsdp at 16-mixed: its ModelParallelStrategy allows",
    ),
    (
        ["fabric", "--precision", "16-mixed"],
        "fabric: --strategy fsdp at 16-mixed: its ModelParallelStrategy allows",
    ),
]


@pytest.mark.parametrize(
    "args, line", REFUSED, ids=["apex", "accelerate", "lightning", "fabric"]
)
def test_what_a_framework_cannot_shard_is_refused_in_one_line(tmp_path, args, line):
    out = tmp_path / "out"
    r = CliRunner().invoke(
        cli, [*args, *FSDP, "--devices", "2", "--dataset", "synthetic", "--out-dir", str(out)]
    )
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ampcompare: error: {line}"), lines
    assert not out.exists()


def test_fsdps_own_mixed_precision_needs_fsdp(tmp_path):
    r = CliRunner().invoke(
        cli, ["plain", "--precision", "bf16-fsdp", "--out-dir", str(tmp_path / "out")]
    )
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [
        "ampcompare: error: --precision bf16-fsdp is FSDP's own mixed precision (its "
        "MixedPrecisionPolicy): it needs --strategy fsdp"
    ]
    r = CliRunner().invoke(
        cli,
        ["compare", "--precisions", "32,bf16-fsdp", "--out-dir", str(tmp_path / "out")],
    )
    assert r.exit_code == 2 and "needs --strategy fsdp" in r.stderr


def test_the_sharding_units_are_the_blocks_innermost_first():
    resnet = models.ResNet18()
    units = sharding.units(resnet)
    assert len(units) == 8 and all(isinstance(u, models.BasicBlock) for u in units)
    assert units[0] is resnet.layers[3][1] and units[-1] is resnet.layers[0][0]
    small = models.SmallCNN()
    assert sharding.units(small) == list(small.features)[::-1]
    assert sharding.units(models.LinearProbe()) == []  # the root alone

    class NestedBlock(torch.nn.Module):  # a block inside a block: the inner one first
        def __init__(self):
            super().__init__()
            self.inner = models.BasicBlock(3, 3, 1)

    nested = NestedBlock()
    assert sharding.units(torch.nn.Sequential(nested)) == [nested.inner, nested]
