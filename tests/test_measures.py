"""Numbers that mean something on every device: activation memory, FLOPs and MFU, accuracy
against seed noise, and the report's explanation of each precision pair."""

import pathlib

import pytest
import torch
from torch import nn

from ampcompare import analysis, plan, report
from common import activations, flops, models, peaks
from lightning_impl import train as lightning
from plain_torch import train as plain
from record.results import Precision, RunResult
from tests.conftest import tiny

MIB = 2**20


def saved_by_kind(model, x, dtype=None):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        with activations.SavedTensors(model) as saved:
            model(x).sum().backward()
    return saved.bytes


def test_saved_tensors_are_sorted_by_kind_and_counted_once():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    x = torch.randn(4, 10)
    fp32 = saved_by_kind(model, x)
    # The input x (4x10) and the hidden activation (4x20, saved once although ReLU's output
    # and the second Linear's input are the same tensor); weights saved as they are: free.
    assert fp32 == {"activations": (4 * 10 + 4 * 20) * 4, "integer": 0, "weight_copies": 0}
    bf16 = saved_by_kind(model, x, torch.bfloat16)
    # autocast's bf16 cast of the second weight (seen as its transpose); the first layer's is
    # not saved, since its input needs no gradient
    assert bf16["weight_copies"] == 20 * 5 * 2
    assert bf16["activations"] < fp32["activations"]
    pooled = saved_by_kind(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2)), torch.randn(2, 3, 8, 8)
    )
    assert pooled["integer"] == 2 * 4 * 3 * 3 * 8  # int64 max-pool indices


def test_activation_memory_halves_in_bf16_and_is_the_same_in_every_arm(tmp_path):
    runs = {
        (arm.__name__, p): arm.train(
            tiny(tmp_path, run_id=f"{arm.__name__}{p}", epochs=1, precision=p)
        )
        for arm in (plain, lightning)
        for p in ("32-true", "bf16-mixed")
    }
    sizes = {k: r.epochs[0]["saved_tensors"] for k, r in runs.items()}
    assert sizes[("plain_torch.train", "32-true")] == sizes[("lightning_impl.train", "32-true")]
    assert (
        sizes[("plain_torch.train", "bf16-mixed")]
        == sizes[("lightning_impl.train", "bf16-mixed")]
    )
    fp32, bf16 = (
        sizes[("plain_torch.train", "32-true")],
        sizes[("plain_torch.train", "bf16-mixed")],
    )
    assert bf16["activations"] / fp32["activations"] == pytest.approx(0.5, abs=0.01)
    assert bf16["integer"] == fp32["integer"] > 0  # max-pool indices do not
    summary = runs[("plain_torch.train", "bf16-mixed")].summary
    assert summary["activation_bytes"] == bf16["activations"] + bf16["integer"]


@pytest.mark.parametrize("arm", ["plain", "lightning", "fabric", "accelerate"])
def test_each_epoch_measures_its_own_peak_and_the_warm_up_is_left_out(
    tmp_path, monkeypatch, arm
):
    # A stand-in allocator peak: it grows with the work done and resets as CUDA's does. The
    # warm-up epoch (epoch 0) does the most, as cuDNN's autotuning does on a GPU.
    import importlib

    from common import metrics

    peak = {"now": 0, "epochs": 0}

    def reset(device):
        peak["epochs"] += 1
        peak["now"] = 100 if peak["epochs"] == 1 else 10 * peak["epochs"]

    monkeypatch.setattr(metrics, "reset_peak_memory", reset)
    monkeypatch.setattr(metrics, "peak_memory_bytes", lambda device: peak["now"])
    module = importlib.import_module(
        f"{dict(plain='plain_torch').get(arm, arm + '_impl')}.train"
    )
    result = module.train(tiny(tmp_path, epochs=3))
    assert result.status == "ok"
    assert [e["peak_memory_bytes"] for e in result.epochs] == [100, 20, 30]
    assert result.summary["peak_memory_bytes"] == 30  # not the warm-up's 100


def conv_flops(c_in, c_out, k, h, w, batch):
    return 2 * c_in * c_out * k * k * h * w * batch


def test_flops_of_a_step_follow_from_the_layer_shapes():
    # SmallCNN: three 3x3 convolutions at 32, 16 and 8 px, a linear head. A training step is
    # the forward, the weight gradients (as much again) and the input gradients (as much
    # again, but not for the first layer, whose input needs none).
    b, w = 8, 32
    convs = [
        conv_flops(3, w, 3, 32, 32, b),
        conv_flops(w, 2 * w, 3, 16, 16, b),
        conv_flops(2 * w, 4 * w, 3, 8, 8, b),
    ]
    head = 2 * 4 * w * 10 * b
    expected = 3 * (sum(convs) + head) - convs[0]
    assert flops.per_step(models.SmallCNN, b) == (expected, "counted on the meta device")
    assert flops.per_step(models.ResNet18, 256)[0] / 256 == pytest.approx(3.33e9, rel=0.001)


class AsksForAValue(nn.Module):
    """A model whose forward reads a tensor's value: it cannot run on the meta device."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        scale = float(x.abs().mean().item() > -1)  # meta tensors have no value
        return self.fc(x.flatten(1)) * scale


class NeverRuns(nn.Module):
    def forward(self, x):
        raise RuntimeError("this model never runs")


def test_flops_of_a_model_the_meta_device_cannot_run_or_the_reason():
    count, how = flops.per_step(AsksForAValue, 64)
    assert count == 2 * (
        2 * 3072 * 10 * 64
    )  # forward and weight gradient: the input needs none
    assert how.startswith("counted on 2 images on the CPU, scaled to the batch")
    count, how = flops.per_step(NeverRuns, 64)
    assert count is None and "not counted" in how and "this model never runs" in how


@pytest.mark.parametrize(
    "name,entry",
    [
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 NVL", None),  # a variant of its own, not in the table: no MFU, not SXM's
        ("NVIDIA T400", None),  # not a T4
        ("Tesla T4", "T4"),
    ],
)
def test_a_device_name_finds_its_own_peak_or_none(name, entry):
    what = {"device": "cuda", "device_name": name, "tf32": False}
    value, why = peaks.peak(what, "16-mixed")
    assert (value is None) == (entry is None) and ("no MFU" in why) == (entry is None), why
    assert entry is None or why.startswith(f"{entry} dense fp16 peak")


def test_the_peak_follows_the_math_a_run_uses():
    h100 = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"}
    fp32, tf32 = (peaks.peak({**h100, "tf32": on}, "32-true") for on in (False, True))
    assert "fp32 peak" in fp32[1] and "tf32 peak" in tf32[1] and tf32[0] > fp32[0]
    value, why = peaks.peak({"device": "cuda", "device_name": "Tesla T4"}, "bf16-mixed")
    assert value is None and "has no bf16 peak" in why
    assert peaks.peak({"device": "cpu"}, "16-mixed")[0] is None


def test_achieved_flops_are_the_work_done_over_the_time(tmp_path):
    result = plain.train(tiny(tmp_path, epochs=2))
    steps = result.epochs[1]["steps"]  # all full batches of 32
    work = flops.per_step(models.SmallCNN, 32)[0] * steps
    row = result.epochs[1]
    assert row["achieved_tflops"] * 1e12 * row["train_time_s"] == pytest.approx(work, rel=1e-6)
    assert result.flops["peak_tflops"] is None and "CPU" in result.flops["peak"]


def test_seeds_multiply_the_arms_and_name_them():
    arms = plan.schedule(["plain"], ["32-true", "bf16-mixed"], 2, seeds=range(3, 5))
    assert len(arms) == 8
    assert {a.run_id for a in arms} >= {"plain-32-true-s3-r0", "plain-bf16-mixed-s4-r1"}
    assert plan.schedule(["plain"], ["32-true"], 1)[0].run_id == "plain-32-true-r0"


def record(precision, seed, acc, time_s=1.0):
    return RunResult.from_dict(
        {
            "run_id": f"{precision}-{seed}",
            "impl": "plain",
            "seed": seed,
            "repeat": 0,
            "status": "ok",
            "precision": {"requested": precision, "effective": precision},
            "opt_level": None,
            "config": {"model": "small", "seed": seed},
            "env": {"device": "cpu", "device_name": "CPU"},
            "epochs": [],
            "summary": {"final_test_acc": acc, "median_epoch_time_s": time_s},
        }
    )


@pytest.mark.parametrize(
    "accuracies,words",
    [
        (
            {"32-true": [0.70, 0.74, 0.78], "bf16-mixed": [0.71, 0.73, 0.77]},
            "within seed noise",
        ),
        (
            {"32-true": [0.70, 0.71, 0.72], "bf16-mixed": [0.60, 0.61, 0.62]},
            "beyond seed noise",
        ),
        ({"32-true": [0.70], "bf16-mixed": [0.60]}, "one seed: no seed spread"),
    ],
)
def test_the_accuracy_change_is_weighed_against_seed_spread(accuracies, words):
    records = [record(p, s, a) for p, accs in accuracies.items() for s, a in enumerate(accs)]
    (group,) = analysis.summarize(records).devices
    cell = group.precisions["32-true"]["plain"]
    assert cell.seeds == len(accuracies["32-true"])
    assert cell.metrics["final_test_acc"].min == min(accuracies["32-true"])
    assert words in report.accuracy_words(group.ratios["plain"]["bf16-mixed"])


@pytest.mark.parametrize(
    "data_mib, verdict",
    [(500, "allocator peak beyond data 0.60x meets"), (0, "allocator peak 0.80x misses")],
)
def test_gpu_targets_weigh_the_allocator_peak_beyond_the_data(tmp_path, data_mib, verdict):
    # A CUDA comparison made from a CPU record (the figures are set by hand): the image sets on
    # the GPU are the same at every precision, so the target is judged without them.
    import copy
    import importlib.util
    import itertools

    spec = importlib.util.spec_from_file_location(
        "gpu_targets", pathlib.Path(__file__).parent.parent / "scripts" / "gpu_targets.py"
    )
    gpu_targets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_targets)
    base = plain.train(tiny(tmp_path, epochs=1))
    records = []
    for (precision, step, peak), repeat in itertools.product(
        (("32-true", 0.25, 1000), ("16-mixed", 0.1, 800)), (0, 1)
    ):  # two repeats each: a verdict rests on the noise between runs
        r = copy.deepcopy(base)
        r.run_id, r.repeat = f"{precision}-r{repeat}", repeat
        r.epochs[0]["step_times_s"] = [step] * 20  # 2.5x the speed, no noise
        r.precision = Precision(precision, precision)
        r.config["precision"] = precision
        r.env.update(device="cuda", device_name="a GPU", data_on_device_bytes=data_mib * MIB)
        r.summary.update(peak_memory_bytes=peak * MIB)
        r.summary["peak_beyond_data_bytes"] = (peak - data_mib) * MIB if data_mib else None
        records.append(r)
    text = "\n".join(gpu_targets.lines(analysis.summarize(records).to_dict()))
    assert "speed 2.50× faster [2.50–2.50]: meets ≥ 2.0" in text, text
    assert verdict in text, text
