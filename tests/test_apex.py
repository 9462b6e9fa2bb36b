"""apex: what can be checked without a GPU (option mapping, the exit-2 messages for each missing
piece) runs everywhere; the real comparisons are marked gpu + apex and run where both exist."""

import contextlib
import json
import math
import sys
import types

import pytest
import torch
from click.testing import CliRunner

from apex_impl import opt_levels
from ampcompare.cli import cli
from common.errors import UsageError
from tests import faults
from tests.conftest import checkpoint_of, on_gpu, run_cli, tiny
from record.results import Precision


@pytest.mark.parametrize(
    "precision,opt_level,expected",
    [
        ("32-true", None, ("O0", "32-true")),
        ("32", None, ("O0", "32-true")),
        ("16-mixed", None, ("O1", "16-mixed")),
        ("auto", None, ("O1", "16-mixed")),
        ("auto", "O2", ("O2", "16-mixed")),
        ("16-mixed", "O2", ("O2", "16-mixed")),
        ("auto", "O3", ("O3", "16-true")),
        ("16-true", None, ("O3", "16-true")),  # pure fp16: the 16-true rung
        ("32-true", "O0", ("O0", "32-true")),
    ],
)
def test_precision_maps_to_opt_level(precision, opt_level, expected):
    level, pol = opt_levels.resolve(precision, opt_level)
    assert (level, pol.effective) == expected


@pytest.mark.parametrize(
    "precision,opt_level,message",
    [
        ("bf16-mixed", None, "apex.amp has no bf16 mode"),
        ("bf16", "O1", "apex.amp has no bf16 mode"),
        ("bf16-true", None, "apex.amp has no bf16 mode"),
        ("32-true", "O1", "--opt-level O1 runs 16-mixed, not --precision 32-true"),
        ("16-mixed", "O0", "--opt-level O0 runs 32-true, not --precision 16-mixed"),
    ],
)
def test_bad_combinations_are_rejected(precision, opt_level, message):
    with pytest.raises(UsageError, match=message):
        opt_levels.resolve(precision, opt_level)


@pytest.mark.parametrize("opt_level", ["O1", "O2"])
def test_an_o2_run_is_not_resumed(tmp_path, opt_level):
    # Checked before apex is even imported, so it holds on any machine.
    cfg = tiny(tmp_path, precision="16-mixed", opt_level=opt_level, resume=str(tmp_path))
    try:
        opt_levels.check(cfg)
        line = ""
    except UsageError as e:  # O1 goes on to what this machine lacks (apex, CUDA), if anything
        line = str(e)
    assert ("--opt-level O2 cannot be continued exactly" in line) == (opt_level == "O2")


def apex_cli(tmp_path, *args):
    out = tmp_path / "runs"
    result = CliRunner().invoke(
        cli, ["apex", "--dataset", "synthetic", "--out-dir", str(out), *args]
    )
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ampcompare: error: "), result.stderr
    assert not out.exists()
    return lines[0]


def test_apex_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", None)  # import apex raises ImportError
    line = apex_cli(tmp_path)
    assert "apex is not installed" in line
    assert f"--branch {opt_levels.RELEASE} https://github.com/NVIDIA/apex" in line


def test_apex_without_amp(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))
    monkeypatch.setitem(sys.modules, "apex.amp", None)  # an apex newer than 25.04
    line = apex_cli(tmp_path)
    assert "has no apex.amp (removed after release 25.04)" in line and "pip install" in line


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message for a machine without CUDA"
)
def test_apex_without_cuda(tmp_path, monkeypatch):
    fake = types.ModuleType("apex")
    fake.amp = types.ModuleType("apex.amp")
    monkeypatch.setitem(sys.modules, "apex", fake)
    monkeypatch.setitem(sys.modules, "apex.amp", fake.amp)
    assert "apex.amp needs a CUDA GPU" in apex_cli(tmp_path)
    assert "--accelerator cuda: no CUDA device" in apex_cli(tmp_path, "--accelerator", "cuda")


def test_bf16_with_apex_is_a_usage_error_before_apex_is_looked_for(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", None)
    assert "apex.amp has no bf16 mode" in apex_cli(tmp_path, "--precision", "bf16")


def test_other_commands_work_without_apex(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", None)
    from plain_torch import train as plain

    assert plain.train(tiny(tmp_path, epochs=1)).status == "ok"


# --- GPU + apex: the real comparisons -------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.apex
def test_apex_o0_is_bitwise_identical_to_plain_fp32(tmp_path):
    from apex_impl import train as apex
    from plain_torch import train as plain

    a = plain.train(on_gpu(tmp_path, run_id="plain", precision="32-true"))
    b = apex.train(on_gpu(tmp_path, run_id="apex", precision="32-true"))
    assert b.opt_level == "O0" and a.status == b.status == "ok"
    assert a.step_losses == b.step_losses
    assert a.weights_sha256 == b.weights_sha256


# fp16 rounding differs between autocast's op lists and apex's, so the runs drift apart: on this
# short run (2 epochs x 16 steps) per-step losses stay within 0.05 on average and 0.25 at worst,
# and final accuracy within 5 points.
LOSS_MEAN_TOL, LOSS_MAX_TOL, ACC_TOL = 0.05, 0.25, 0.05


@pytest.mark.gpu
@pytest.mark.apex
@pytest.mark.parametrize("opt_level", ["O1", "O2"])
def test_apex_mixed_tracks_plain_fp16(tmp_path, opt_level):
    from apex_impl import train as apex
    from plain_torch import train as plain

    a = plain.train(on_gpu(tmp_path, run_id="plain", precision="16-mixed", deterministic=False))
    b = apex.train(
        on_gpu(
            tmp_path,
            run_id="apex",
            precision="16-mixed",
            opt_level=opt_level,
            deterministic=False,
        )
    )
    assert a.status == b.status == "ok"
    diffs = [abs(x - y) for x, y in zip(a.step_losses, b.step_losses)]
    assert len(diffs) == len(a.step_losses) == len(b.step_losses)
    assert sum(diffs) / len(diffs) <= LOSS_MEAN_TOL and max(diffs) <= LOSS_MAX_TOL, diffs
    assert abs(a.summary["final_test_acc"] - b.summary["final_test_acc"]) <= ACC_TOL


def poison_gradient_at(monkeypatch, step):
    """Make the first conv's gradient inf on one backward pass, in whichever loop runs."""
    from common import model_spec

    real = model_spec.build_model

    def build_model(cfg):
        model = real(cfg)
        calls = {"n": 0}

        def hook(grad):
            calls["n"] += 1
            return torch.full_like(grad, math.inf) if calls["n"] == step else grad

        next(model.parameters()).register_hook(hook)
        return model

    monkeypatch.setattr(model_spec, "build_model", build_model)


@pytest.mark.gpu
@pytest.mark.apex
@pytest.mark.parametrize("impl", ["plain", "apex"])
def test_an_inf_gradient_skips_the_step_and_lowers_the_scale(tmp_path, monkeypatch, impl):
    import importlib

    module = importlib.import_module(
        {"plain": "plain_torch.train", "apex": "apex_impl.train"}[impl]
    )
    cfg = dict(precision="16-mixed", epochs=1, deterministic=False)
    clean = module.train(on_gpu(tmp_path, run_id="clean", **cfg))
    poison_gradient_at(monkeypatch, 3)
    poisoned = module.train(on_gpu(tmp_path, run_id="poisoned", **cfg))
    assert clean.status == poisoned.status == "ok"
    assert poisoned.epochs[0]["skipped_steps"] == clean.epochs[0]["skipped_steps"] + 1
    assert poisoned.epochs[0]["loss_scale"] == clean.epochs[0]["loss_scale"] / 2  # backoff 0.5


def test_o1_leaves_torch_as_it_found_it(tmp_path, monkeypatch):
    # The real apex on a CPU: its checks for CUDA tensors are lifted, so that O1's
    # amp.initialize patches torch here as it does on a GPU; the run then fails in apex's
    # optimizer (CPU parameters), and torch must be put back however the run ends.
    pytest.importorskip("apex.amp", reason="needs the apex 25.04 wheel (make test installs it)")
    from apex.amp import _initialize
    from apex.amp import amp as apex_amp

    from apex_impl import train as apex
    from plain_torch import train as plain
    from tests.conftest import torch_changed, torch_functions

    monkeypatch.setattr(_initialize, "check_models", lambda models: None)
    monkeypatch.setattr(_initialize, "check_params_fp32", lambda models: None)
    monkeypatch.setattr(
        torch.cuda, "IntTensor", lambda data: torch.tensor(data, dtype=torch.int32)
    )
    monkeypatch.setattr(
        apex, "check", lambda cfg: opt_levels.resolve(cfg.precision, cfg.opt_level)
    )
    before, patched = torch_functions(), []
    real_init = apex_amp.init

    def amp_init(*args, **kwargs):  # what O1 changed, seen from inside the run
        handle = real_init(*args, **kwargs)
        patched.extend(torch_changed(before))
        return handle

    monkeypatch.setattr(apex_amp, "init", amp_init)  # _initialize imports it when it runs
    apex.train(tiny(tmp_path, run_id="apex", precision="16-mixed", batch_size=32))
    assert len(patched) > 100  # O1 did patch torch, or this test would prove nothing
    assert torch_changed(before) == []
    assert plain.train(tiny(tmp_path, run_id="plain")).status == "ok"


def test_a_missing_apex_never_imports_the_apex_loop(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", None)
    monkeypatch.delitem(sys.modules, "apex_impl.train", raising=False)
    apex_cli(tmp_path)
    assert "apex_impl.train" not in sys.modules


class O0Amp:
    """A stand-in with apex.amp's O0 behaviour (fp32, loss scale 1), so that the apex loop's own
    code runs on any CPU. The real apex is exercised by the gpu + apex tests above."""

    def initialize(self, model, optimizer, opt_level, verbosity):
        assert opt_level == "O0" and verbosity == 0
        return model, optimizer

    @contextlib.contextmanager
    def scale_loss(self, loss, optimizer):
        yield loss

    def master_params(self, optimizer):
        for group in optimizer.param_groups:
            yield from group["params"]

    def state_dict(self):
        return {"loss_scaler0": {"loss_scale": 1.0, "unskipped": 0}}

    def load_state_dict(self, state):
        assert state == self.state_dict()


@pytest.mark.parametrize("clip_grad", [0.0, 0.05])
def test_apex_loop_matches_plain_at_o0_with_a_stand_in_amp(tmp_path, monkeypatch, clip_grad):
    from apex_impl import train as apex
    from plain_torch import train as plain

    monkeypatch.setattr(apex, "amp", O0Amp())
    monkeypatch.setattr(
        apex, "check", lambda cfg: opt_levels.resolve(cfg.precision, cfg.opt_level)
    )
    a = plain.train(tiny(tmp_path, run_id="plain", clip_grad=clip_grad))
    b = apex.train(tiny(tmp_path, run_id="apex", clip_grad=clip_grad))
    assert b.status == "ok" and b.impl == "apex" and b.opt_level == "O0"
    assert b.precision == Precision("32-true", "32-true")
    assert a.step_losses == b.step_losses and a.weights_sha256 == b.weights_sha256
    assert [r["loss_scale"] for r in b.epochs] == [None, None]
    ckpt = torch.load(checkpoint_of(tmp_path / "runs" / "apex"), weights_only=True)
    assert ckpt["amp"] == {"loss_scaler0": {"loss_scale": 1.0, "unskipped": 0}}


def stopped_and_resumed(module, make, tmp_path, monkeypatch, **overrides):
    """A 2-epoch run interrupted after 2 steps of epoch 1, then resumed."""
    with monkeypatch.context() as m:
        faults.inject(m, epoch=1, action="interrupt", step=2)
        stopped = module.train(make(tmp_path, run_id="stopped", **overrides))
    assert stopped.status == "interrupted"
    return module.train(
        make(tmp_path, run_id="stopped", resume=str(tmp_path / "runs" / "stopped"), **overrides)
    )


def test_apex_loop_resumes_bitwise_with_a_stand_in_amp(tmp_path, monkeypatch):
    from apex_impl import train as apex

    monkeypatch.setattr(apex, "amp", O0Amp())
    monkeypatch.setattr(
        apex, "check", lambda cfg: opt_levels.resolve(cfg.precision, cfg.opt_level)
    )
    straight = apex.train(tiny(tmp_path, run_id="straight"))
    resumed = stopped_and_resumed(apex, tiny, tmp_path, monkeypatch)
    assert resumed.status == "ok" and resumed.step_losses == straight.step_losses
    assert resumed.weights_sha256 == straight.weights_sha256


@pytest.mark.gpu
@pytest.mark.apex
def test_apex_o1_resumes_bitwise_on_gpu(tmp_path, monkeypatch):
    # Each run in a process of its own, as users run them: O1 patches torch for the rest of
    # its process, and amp.initialize is meant to be called once.
    out = tmp_path / "runs"
    args = [
        "apex",
        "--dataset",
        "synthetic",
        "--model",
        "small",
        "--synthetic-size",
        "2048",
        "--batch-size",
        "128",
        "--epochs",
        "2",
        "--precision",
        "16-mixed",
        "--accelerator",
        "cuda",
        "--deterministic",
        "--quiet",
        "--out-dir",
        str(out),
    ]
    assert run_cli([*args, "--run-id", "straight"]).returncode == 0
    faults.inject_children(monkeypatch, epoch=1, action="interrupt", step=2)
    assert run_cli([*args, "--run-id", "stopped"]).returncode == 130
    monkeypatch.delenv(faults.ENV)
    proc = run_cli(["apex", "--resume", str(out / "stopped")])
    assert proc.returncode == 0, proc.stderr
    a, b = (
        json.loads((out / name / "result.json").read_text()) for name in ("straight", "stopped")
    )
    assert a["step_losses"] == b["step_losses"] and a["weights_sha256"] == b["weights_sha256"]
    assert [e["loss_scale"] for e in a["epochs"]] == [e["loss_scale"] for e in b["epochs"]]
