"""Sharded data parallel (--strategy fsdp: torch's FSDP2) on torch.distributed, 2 processes,
gloo, CPU: the plain loop, Lightning's ModelParallelStrategy and Fabric's give bitwise-identical
per-step losses and full weights at every rung they share; plain FSDP gives plain DDP's at
32-true, with half the model state per rank; a stopped job resumes bitwise in every arm; and
what a framework cannot do is refused in one line. Jobs run as test_ddp.py's do: through the
command line, each rank a process of its own, under a time limit."""

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from ampcompare.cli import cli
from common import models, sharding
from common.config import Config
from common.errors import Unavailable, UsageError
from tests import faults
from tests.conftest import ARMS_ONLY, ROOT, run_cli
from tests.test_ddp import JOB, LIMIT, gone, job

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


def test_an_fsdp_comparison_shows_half_the_state_of_ddp_and_identical_weights(tmp_path):
    """compare --strategy fsdp runs the plain loop under DDP beside the arms: every arm trains
    the same at 32-true and at FSDP's own bf16-fsdp (autocast's bf16-mixed: the next test);
    plain FSDP trains DDP's weights bitwise at 32-true; the report shows each arm's model
    state per rank at half of DDP's."""
    args = [
        "compare",
        *FSDP,
        *JOB,
        "--impls",
        "plain,lightning,fabric",
        "--precisions",
        "32-true,bf16-fsdp",
        "--epochs",
        "2",
        "--out-dir",
        str(tmp_path),
        *ARMS_ONLY,
    ]
    proc = run_cli(args, timeout=6 * LIMIT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = tmp_path.glob("compare-*")
    records = {p.parent.name: json.loads(p.read_text()) for p in folder.glob("*/result.json")}
    for precision in ("32-true", "bf16-fsdp"):
        assert_identical({arm: records[f"{arm}-{precision}-r0"] for arm in ARMS})
    ddp = records["plain-ddp-32-true-r0"]
    assert ddp["config"]["strategy"] == "ddp" and ddp["status"] == "ok"
    sharded = records["plain-32-true-r0"]
    assert sharded["step_losses"] == ddp["step_losses"]
    assert sharded["weights_sha256"] == ddp["weights_sha256"]
    for part in ("parameters", "gradients", "optimizer"):
        # Each rank keeps its shard: half, give or take the padding of an odd-sized tensor.
        ratio = (
            sharded["epochs"][-1]["model_state"][part] / ddp["epochs"][-1]["model_state"][part]
        )
        assert 0.45 < ratio <= 0.55, part
    report = (folder / "report.md").read_text()
    assert "## Model state per rank:" in report and "strategy fsdp against" in report
    table = report[report.index("## Model state per rank:") :].splitlines()
    rows = [line.split(" | ") for line in table if line.startswith(("| plain", "| l", "| f"))]
    assert len(rows) == 3, table  # three arms at the precision DDP has too
    for row in rows:  # all of it, per rank, against DDP's; and DDP's weights, bitwise
        assert 0.45 < float(row[-2].rstrip("×")) <= 0.55 and row[-1] == "identical |", row
    assert "| 32-true | plain = lightning = fabric |" in report


def test_an_fsdp_job_stopped_mid_epoch_resumes_bitwise_in_every_arm(tmp_path, monkeypatch):
    """Each arm's job at bf16-mixed (autocast over fp32 shards), stopped mid-epoch, resumes
    from its gathered checkpoint to the plain loop's straight run: every arm resumes bitwise,
    and trains what plain trains. Accelerate, which turns FSDP on only for GPUs, with that one
    decision changed (tests/faults.py): its FSDP2 plugin, autocast and checkpoints, proven."""
    args = (*FSDP, "--precision", "bf16-mixed", "--epochs", "2")
    straight = job("plain", tmp_path, "straight", *args)
    faults.shard_accelerate_on_cpu(monkeypatch)
    faults.inject_children(monkeypatch, epoch=1, action="interrupt", step=2)
    for arm in (*ARMS, "accelerate"):
        stopped = job(arm, tmp_path, arm, *args, expect=130)
        assert stopped["status"] == "interrupted" and stopped["checkpoint"]["epochs"] == 1
    monkeypatch.delenv(faults.ENV)
    for arm in (*ARMS, "accelerate"):
        proc = run_cli([arm, "--resume", str(tmp_path / arm), "--quiet"], timeout=LIMIT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        resumed = json.loads((tmp_path / arm / "result.json").read_text())
        assert resumed["status"] == "ok" and resumed["config"]["strategy"] == "fsdp"
        assert resumed["step_losses"] == straight["step_losses"], arm
        assert resumed["weights_sha256"] == straight["weights_sha256"], arm
        assert resumed["epochs"][-1]["model_state"] == straight["epochs"][-1]["model_state"]


# apex, Lightning at 16-mixed and bf16-fsdp without fsdp: the catalogue (test_catalogue.py)
REFUSED = [
    (["accelerate"], "accelerate: --strategy fsdp: Accelerate never turns FSDP on for a CPU"),
    (
        ["fabric", "--precision", "16-mixed"],
        "fabric: --strategy fsdp at 16-mixed: its ModelParallelStrategy allows",
    ),
]


@pytest.mark.parametrize("args, line", REFUSED, ids=["accelerate", "fabric"])
def test_what_a_framework_cannot_shard_is_refused_in_one_line(tmp_path, args, line):
    out = tmp_path / "out"
    r = CliRunner().invoke(
        cli, [*args, *FSDP, "--devices", "2", "--dataset", "synthetic", "--out-dir", str(out)]
    )
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ampcompare: error: {line}"), lines
    assert not out.exists()


def test_accelerate_shards_only_where_it_turns_fsdp_on_and_never_at_bf16_fsdp():
    """On a GPU the arm runs Accelerate's FSDP2 in a job of processes (one device: torchrun
    --nproc-per-node 1); it refuses bf16-fsdp, whose norm layers Accelerate's one policy would
    cast; and an Accelerator that did not turn FSDP2 on is never recorded as sharded."""
    from accelerate import Accelerator

    from accelerate_impl.precision import refuse_sharding, refuse_unless_sharding

    gpu = torch.device("cuda")
    refuse_sharding(Config(strategy="fsdp", devices=2), gpu)
    refuse_sharding(Config(devices=1), gpu)  # DDP or one process: nothing to refuse
    for cfg, words in [
        (Config(strategy="fsdp", devices=2, precision="bf16-fsdp"), "BatchNorm included"),
        (Config(strategy="fsdp", devices=1), "torchrun --nproc-per-node 1"),
    ]:
        with pytest.raises(Unavailable, match=words):
            refuse_sharding(cfg, gpu)
    with pytest.raises(Unavailable, match=r"did not turn FSDP2 on \(it runs NO\)"):
        refuse_unless_sharding(Accelerator(cpu=True))


def test_accelerate_is_given_the_blocks_as_its_units():
    """Accelerate picks FSDP2's units by class name: the names the arm gives it select
    exactly the blocks every other arm shards, through Accelerate's own policy function."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    for model in (models.ResNet18(), models.SmallCNN(), models.LinearProbe()):
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=sharding.unit_classes(model),
        )
        plugin.set_auto_wrap_policy(model)
        chosen = fsdp2_prepare_auto_wrap_policy(plugin, model)
        picked = [m for m in model.modules() if m is not model and chosen(m)]
        assert picked == sharding.units(model)[::-1], type(model).__name__


class NestedBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = models.BasicBlock(3, 3, 1)


def test_the_sharding_units_are_the_blocks_innermost_first():
    resnet = models.ResNet18()
    units = sharding.units(resnet)
    assert len(units) == 8 and all(isinstance(u, models.BasicBlock) for u in units)
    assert units[0] is resnet.layers[3][1] and units[-1] is resnet.layers[0][0]
    small = models.SmallCNN()
    assert sharding.units(small) == list(small.features)[::-1]
    assert sharding.units(models.LinearProbe()) == []  # the root alone

    nested = NestedBlock()  # a block inside a block: the inner one first
    assert sharding.units(torch.nn.Sequential(nested)) == [nested.inner, nested]


def test_sharded_is_known_after_an_evaluation_and_what_fsdp_refuses_is_one_line():
    """After a forward without backward FSDP leaves the root's parameters gathered, plain
    tensors: a model whose root holds them all (the linear probe) looked unsharded then, and
    one rank gathered its weights for their hash while the other did not."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = sharding.shard(models.LinearProbe(), init_device_mesh("cpu", (1,)))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        optimizer.step()
        assert sharding.is_sharded(model)
        with torch.inference_mode():
            model.eval()
            model(torch.randn(2, 3, 32, 32))
        assert not any(isinstance(p, DTensor) for p in model.parameters())
        assert sharding.is_sharded(model)
        assert not sharding.is_sharded(models.LinearProbe())
        # What FSDP cannot shard is the model's to change: one line, not a traceback.
        tied = torch.nn.Sequential(models.BasicBlock(3, 3, 1), models.BasicBlock(3, 3, 1))
        tied[1].conv1.weight = tied[0].conv1.weight
        with pytest.raises(UsageError, match=r"^--strategy fsdp: parameter 0.conv1.weight is"):
            sharding.shard(tied, init_device_mesh("cpu", (1,)))
        sharding.refuse_shared_parameters(NestedBlock())  # held by a block and its block
    finally:
        dist.destroy_process_group()


def torchrun_job(arm, out, precision, accelerator="cuda"):
    """One arm's FSDP job as torchrun starts it on one device: Accelerate turns FSDP on only
    in a job it sees launched."""
    command = [
        sys.executable,
        *("-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "ampcompare", arm),
        *FSDP,
        *("--devices", "1", "--dataset", "synthetic", "--model", "small"),
        *("--synthetic-size", "512", "--batch-size", "128", "--epochs", "2"),
        *("--deterministic", "--accelerator", accelerator, "--quiet"),
        *("--precision", precision, "--out-dir", str(out), "--run-id", arm),
    ]
    proc = subprocess.run(command, cwd=ROOT, text=True, capture_output=True, timeout=LIMIT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / arm / "result.json").read_text())


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_accelerate_fsdp_on_a_gpu_trains_the_plain_loops_weights(tmp_path, precision):
    """Accelerate's FSDP2 on a GPU, with no change: the plain loop's losses, weights and
    model state, bitwise, in a job of one process (16-mixed: both with torch's GradScaler),
    at the mixed rungs (32-true differs from them only in having no autocast)."""
    if precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    plain = torchrun_job("plain", tmp_path, precision)
    accelerate = torchrun_job("accelerate", tmp_path, precision)
    assert accelerate["env"]["device"] == "cuda" and accelerate["config"]["strategy"] == "fsdp"
    assert accelerate["step_losses"] == plain["step_losses"]
    assert accelerate["weights_sha256"] == plain["weights_sha256"]
    assert accelerate["epochs"][-1]["model_state"] == plain["epochs"][-1]["model_state"]
