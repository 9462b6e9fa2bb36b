"""Any model: torchvision's and timm's by name, or the user's own by import path, built the same
way in every arm (bitwise parity holds for them as for ours), each spec that cannot train on
CIFAR-10 refused in one line, and the record keeping what was trained."""

import json
import sys

import pytest
from click.testing import CliRunner

from ampcompare import analysis
from ampcompare.cli import cli
from common import model_spec
from lightning_impl import train as lightning
from plain_torch import train as plain
from tests.test_parity import assert_identical
from tests.conftest import tiny

USER_MODULE = """
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def build():
    return Tiny()


def wrong_shape():
    return Tiny(classes=5)


def not_a_module():
    return 42


class AsksForAValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):  # reads a value: it cannot run on the meta device
        return self.fc(x.flatten(1)) * float(x.abs().mean().item() > -1)


answer = 42


def exits():
    import sys

    sys.exit(0)


def hard_exit():
    import os

    os._exit(3)


class ExitsInForward(Tiny):
    def forward(self, x):
        raise SystemExit(0)


def two_lines():
    raise ValueError("line one\\nline two")


def no_parameters():
    return nn.Sequential(nn.Flatten(), nn.Identity())


class Counts(Tiny):
    def forward(self, x):
        return super().forward(x).round().long()


def from_numpy_and_random():
    import random

    import numpy as np

    model = Tiny()
    with torch.no_grad():
        model.fc.bias.copy_(torch.tensor(np.random.rand(10) + random.random()))
    return model


class ExitsLater(Tiny):
    calls = 0

    def forward(self, x):
        ExitsLater.calls += 1
        if ExitsLater.calls > 8:  # past the checks and the FLOP count: inside the loop
            raise SystemExit(0)
        return super().forward(x)


class NaNs(Tiny):
    def forward(self, x):
        return super().forward(x) * float("nan")
"""

TINY = dict(synthetic_size=64, batch_size=8, limit_train_batches=2, limit_test_batches=1)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """mymodels.py in a working folder of the user's, and that folder as the working folder."""
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "mymodels.py").write_text(USER_MODULE)
    (folder / "broken.py").write_text("import math\nvalue = 1 / 0\n")
    (folder / "ends.py").write_text("import sys\nsys.exit(0)\n")
    (folder / "ends_hard.py").write_text("import os\nos._exit(0)\n")
    (folder / "common.py").write_text(USER_MODULE)  # named like this tool's own package
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the working folder joins it: undone
    yield folder
    for name in ("mymodels", "broken", "ends", "ends_hard", "pkg", "pkg.net"):
        sys.modules.pop(name, None)


def both(tmp_path, **overrides):
    a = plain.train(tiny(tmp_path, run_id="plain", **{**TINY, **overrides}))
    b = lightning.train(tiny(tmp_path, run_id="lightning", **{**TINY, **overrides}))
    assert a.status == b.status == "ok", (a.error, b.error)
    return a, b


def test_a_users_own_module_trains_bitwise_alike_and_is_recorded(tmp_path, user_module):
    a, b = both(tmp_path, model="mymodels:build")
    assert_identical(a, b)
    source = user_module / "mymodels.py"
    assert a.model == {
        "spec": "mymodels:build",
        "parameters": 3 * 8 * 9 + 8 + 16 + 8 * 10 + 10,
        "source": str(source),
        # over the one file of the model's own the run loaded (no other from its folder)
        "source_sha256": model_spec.sources_sha256([str(source)]),
    }
    assert b.model == a.model
    assert a.flops["per_step"] and a.flops["counted"] == "counted on the meta device"


@pytest.mark.parametrize("model", ["torchvision:shufflenet_v2_x0_5", "timm:test_efficientnet"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_torchvision_and_timm_models_train_bitwise_alike(tmp_path, model, precision):
    a, b = both(tmp_path, model=model, precision=precision)
    assert_identical(a, b)
    assert a.model["spec"] == model and a.model["source"] is None and a.model["parameters"] > 0
    assert a.summary["activation_bytes"] == b.summary["activation_bytes"] > 0


def test_flops_of_a_model_the_meta_device_cannot_run(tmp_path, user_module):
    result = plain.train(tiny(tmp_path, model="mymodels:AsksForAValue", **TINY))
    assert result.status == "ok", result.error
    assert result.flops["per_step"] == 2 * (2 * 3072 * 10 * 8)
    assert result.flops["counted"].startswith("counted on 2 images on the CPU")


@pytest.mark.parametrize(
    "spec,line",
    [
        ("torchvision:nonexistent", "torchvision has no classification model 'nonexistent'"),
        ("timm:nonexistent", "timm has no model 'nonexistent'"),
        (
            "nosuchmodule:build",
            "cannot import nosuchmodule (ModuleNotFoundError: No module named 'nosuchmodule')",
        ),
        ("broken:build", "cannot import broken (ZeroDivisionError: division by zero)"),
        ("mymodels:missing", "mymodels has no missing"),
        ("mymodels:answer", "answer in mymodels is a int, not a callable that returns a model"),
        ("mymodels:not_a_module", "it returned int, not a torch.nn.Module"),
        (
            "mymodels:wrong_shape",
            "a forward of a 2-image batch [2, 3, 32, 32] gave [2, 5], not [2, 10] logits",
        ),
        ("torchvision:inception_v3", "needs inputs of at least 75x75 (torchvision's min_size)"),
        ("timm:vit_tiny_patch16_224", "needs inputs of at least 224x224; CIFAR-10's are 32x32"),
        ("torchvision:", "name a torchvision model after the colon"),
        (
            "mymodels:exits",
            "building it ended the process (sys.exit(0)); a model must not exit",
        ),
        ("mymodels:hard_exit", "building it ended the process (os._exit(3))"),
        ("mymodels:ExitsInForward", "its forward ended the process (sys.exit(0))"),
        ("sys:exit", "building it ended the process (sys.exit(None))"),
        ("ends:build", "importing ends ended the process (sys.exit(0))"),
        ("ends_hard:build", "importing ends_hard ended the process (os._exit(0))"),
        ("mymodels:two_lines", "building it failed (ValueError: line one line two)"),
        ("mymodels:no_parameters", "it has no parameters to train"),
        ("mymodels:Counts", "its forward gave torch.int64 outputs, not floating-point logits"),
        ("torchvision:googlenet", "gave GoogLeNetOutputs, not [2, 10] logits"),
        ("common:build", "the common imported is this tool's own package, from "),
        (
            "vit",
            "not one of resnet18, small, linear, and not torchvision:NAME, timm:NAME or "
            "package.module:callable",
        ),
    ],
)
def test_a_model_that_cannot_train_here_is_one_line_and_writes_nothing(
    tmp_path, user_module, spec, line
):
    out = tmp_path / "out"
    for command in ("plain", "compare"):
        r = CliRunner().invoke(
            cli,
            [
                command,
                "--model",
                spec,
                "--dataset",
                "synthetic",
                "--accelerator",
                "cpu",
                "--out-dir",
                str(out),
            ],
        )
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1, (command, r.output)
        assert lines[0].startswith("ampcompare: error: --model ") and line in lines[0], lines[0]
        assert not out.exists()


def test_without_timm_a_timm_model_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm fails, as when it is absent
    r = CliRunner().invoke(
        cli,
        [
            "plain",
            "--model",
            "timm:resnet18",
            "--dataset",
            "synthetic",
            "--accelerator",
            "cpu",
            "--out-dir",
            str(tmp_path / "out"),
        ],
    )
    assert r.exit_code == 2 and r.stderr.strip() == (
        "ampcompare: error: --model timm:resnet18: timm is not installed; pip install "
        ".[timm] (or pip install timm)"
    )


def test_the_model_is_a_setting_and_so_is_its_source(tmp_path, user_module):
    runs = tmp_path / "runs"
    for run_id, model in (("a", "small"), ("b", "linear"), ("c", "mymodels:build")):
        plain.train(tiny(tmp_path, run_id=run_id, model=model, epochs=1, **TINY))
    record = json.loads((runs / "c" / "result.json").read_text())
    (runs / "d").mkdir()
    record.update(run_id="d", model={**record["model"], "source_sha256": "0" * 64})
    (runs / "d" / "result.json").write_text(json.dumps(record))
    groups = analysis.summarize(analysis.load([runs])).devices
    assert len(groups) == 4  # never one cell
    assert any("model_source_sha256 " + "0" * 64 in g.device for g in groups)


def test_a_resume_with_the_models_source_changed_is_refused(tmp_path, user_module, monkeypatch):
    from tests import faults

    with monkeypatch.context() as m:
        faults.inject(m, epoch=1, action="interrupt")
        plain.train(tiny(tmp_path, run_id="s", model="mymodels:build", epochs=2, **TINY))
    (user_module / "mymodels.py").write_text(USER_MODULE + "\n# changed\n")
    sys.modules.pop("mymodels", None)
    r = CliRunner().invoke(cli, ["plain", "--resume", str(tmp_path / "runs" / "s")])
    assert r.exit_code == 2 and "the source of --model mymodels:build changed" in r.stderr


def test_a_model_drawing_from_numpy_and_random_starts_alike_in_every_arm(tmp_path, user_module):
    import random

    import numpy as np

    np.random.seed(1), random.seed(1)  # whatever the process drew before, the build is seeded
    a = plain.train(tiny(tmp_path, run_id="a", model="mymodels:from_numpy_and_random", **TINY))
    np.random.seed(2), random.seed(2)
    b = lightning.train(
        tiny(tmp_path, run_id="b", model="mymodels:from_numpy_and_random", **TINY)
    )
    assert a.status == b.status == "ok"
    assert_identical(a, b)
    random.seed(3)
    with model_spec.seeded(0):
        random.random()
    assert random.random() == random.Random(3).random()  # the caller's state is given back


def test_nan_logits_give_no_accuracy(tmp_path, user_module):
    result = plain.train(tiny(tmp_path, run_id="n", model="mymodels:NaNs", **TINY))
    assert result.status == "diverged"
    assert all(e["test_acc"] is None for e in result.epochs)


PACKAGE = {
    "pkg/__init__.py": "from pkg.net import build\n",
    "pkg/net.py": USER_MODULE,
}


def test_a_resume_with_a_submodule_of_the_models_package_changed_is_refused(
    tmp_path, user_module, monkeypatch
):
    from tests import faults

    for name, text in PACKAGE.items():
        (user_module / name).parent.mkdir(exist_ok=True)
        (user_module / name).write_text(text)
    with monkeypatch.context() as m:
        faults.inject(m, epoch=1, action="interrupt")
        plain.train(tiny(tmp_path, run_id="s", model="pkg:build", epochs=2, **TINY))
    record = json.loads((tmp_path / "runs" / "s" / "result.json").read_text())
    assert record["model"]["source"].endswith("pkg/__init__.py")
    (user_module / "pkg" / "net.py").write_text(USER_MODULE + "\n# changed\n")
    for name in ("pkg", "pkg.net"):
        sys.modules.pop(name, None)
    r = CliRunner().invoke(cli, ["plain", "--resume", str(tmp_path / "runs" / "s")])
    assert r.exit_code == 2 and "the source of --model pkg:build changed" in r.stderr


def test_a_model_that_exits_inside_the_loop_is_a_failure_not_a_success(tmp_path, user_module):
    r = CliRunner().invoke(
        cli,
        [
            "plain",
            "--model",
            "mymodels:ExitsLater",
            "--dataset",
            "synthetic",
            "--synthetic-size",
            "64",
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--accelerator",
            "cpu",
            "--out-dir",
            str(tmp_path),
            "--run-id",
            "x",
            "--quiet",
        ],
    )
    assert r.exit_code == 1, r.output
    assert "sys.exit(0) was called during the run" in r.stderr
    record = json.loads((tmp_path / "x" / "result.json").read_text())
    assert record["status"] == "failed" and "SystemExit" in record["error"]
