import json
import os
import subprocess
import sys
import tarfile

import click
import pytest
from click.testing import CliRunner

from ampcompare.cli import cli
from tests.conftest import AMPCOMPARE, tiny


def commands():
    return sorted(cli.commands)


def invoke(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.mark.parametrize("name", commands())
def test_every_command_has_help_and_every_option_states_its_default(name):
    command = cli.commands[name]
    assert command.help and len(command.help) > 20
    result = invoke([name, "--help"])
    assert result.exit_code == 0
    for param in command.params:
        if isinstance(param, click.Option) and param.name != "help":
            assert param.help, f"{name} {param.opts} has no help"
            assert "[default:" in param.help, f"{name} {param.opts} does not state its default"


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ampcompare",
            "plain",
            "--precision",
            "fp8",
            "--out-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert proc.returncode == 2
    assert (
        proc.stderr == "ampcompare: error: unknown precision 'fp8': use one of 32-true, "
        "16-mixed, bf16-mixed, bf16-true, 16-true, bf16-fsdp (or 32, 16, bf16, auto)\n"
    )
    assert proc.stdout == ""


def test_plain_command_does_not_import_lightning_or_apex(tmp_path):
    code = (
        "import sys; from ampcompare.cli import cli\n"
        "try: cli.main(['plain', '--dataset', 'synthetic', '--model', 'small', "
        "'--synthetic-size', '64', '--batch-size', '32', '--epochs', '1', '--quiet', "
        f"'--accelerator', 'cpu', '--out-dir', {str(tmp_path)!r}])\n"
        "except SystemExit as e: assert e.code == 0, e.code\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('pytorch_lightning', 'lightning', 'apex')]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", commands())
def test_every_command_is_in_the_readme(name):
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")) as f:
        readme = f.read()
    assert f"ampcompare {name}" in readme


BENCH_FIGURES = (
    "lightning_cost_per_step",
    "fabric_cost_per_step",
    "accelerate_cost_per_step",
    "control_cost_per_step",
    "control_ratio",
    "lightning_cost_share_of_small_step",
    "bf16_over_fp32",
    "control_over_fp32",
    "data_wait_fraction",
    "loader_over_torchvision",
)


def test_the_bench_runs_and_writes_every_ratio(tmp_path):
    root = os.path.dirname(os.path.dirname(__file__))
    proc = subprocess.run(
        [
            *AMPCOMPARE,
            "bench",
            "--processes",
            "3",
            "--rounds",
            "2",
            "--linear-rounds",
            "3",
            "--synthetic-size",
            "128",
            "--batch-size",
            "64",
            "--out-dir",
            str(tmp_path),
        ],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["processes"] == 3 and "between the bench's processes" in bench["covers"]
    assert " a step" in proc.stdout
    (folder,) = tmp_path.glob("compare-*")
    parts = [json.loads(p.read_text()) for p in sorted(folder.glob("process-*/rounds.json"))]
    assert len(parts) == 3 and all(len(p["linear"]["plain"]) == 3 for p in parts)
    records = [json.loads(p.read_text()) for p in folder.glob("process-*/*/result.json")]
    assert len({r["env"]["pid"] for r in records}) == 3  # each process's arms: its threads
    for name in BENCH_FIGURES:
        figure = bench[name]
        lo, hi = figure["interval"]
        assert figure["processes"] == 3 and figure["df"] == 2, name
        assert lo <= figure["estimate"] <= hi and figure["verdict"], name
    assert bench["bf16_over_fp32_activation_memory"] < 0.7
    assert bench["control_ratio"]["target_verdict"].split(":")[0] in ("holds", "FAILS")
    assert bench["lightning_cost_per_step"]["target_verdict"].split(":")[0] in (
        "resolved",
        "not resolved",
    )
    assert "lightning_cost_per_step" in proc.stdout


def test_the_bench_pools_its_processes_figures():
    from ampcompare import bench

    def part(cost):  # plain's linear step 1 ms in every round; Lightning's 1 ms + cost
        rounds = lambda t: [[t] * 8 for _ in range(5)]  # noqa: E731
        small = {k: rounds(0.05) for k in ("32-true", "control")}
        return {
            "linear": {
                "plain": rounds(1e-3),
                "lightning": rounds(1e-3 + cost),
                "fabric": rounds(1e-3),
                "accelerate": rounds(1e-3),
                "control": rounds(1e-3),
            },
            "small": {
                **small,
                "bf16-mixed": rounds(0.03),
                "waits": rounds(0.0005),
                "activation_ratio": 0.6,
            },
            "loader": {"ours": rounds(1e-5), "theirs": rounds(2e-4)},
        }

    # Three processes that disagree, each sure of itself (no spread within): the interval
    # covers all three, as t with 2 degrees of freedom over their spread says.
    report = bench.pooled([part(c) for c in (300e-6, 900e-6, 600e-6)])
    cost = report["lightning_cost_per_step"]
    assert cost["estimate"] == pytest.approx(600, rel=1e-6) and cost["df"] == 2
    assert cost["interval"][0] < 300 and cost["interval"][1] > 900
    # One process alone: figures, and no verdict, on the targets neither: a control whose
    # interval misses 1 there says nothing of the method (its interval has no process noise).
    alone = bench.pooled([part(600e-6)])
    one = alone["lightning_cost_per_step"]
    assert one["verdict"].startswith("not enough processes to tell")
    assert one["target_verdict"] == "cannot tell: too few processes"
    assert alone["control_ratio"]["target_verdict"] == "cannot tell: too few processes"
    assert alone["control_over_fp32"]["target_verdict"] == "cannot tell: too few processes"
    assert report["bf16_over_fp32"]["estimate"] == pytest.approx(0.6)
    assert report["data_wait_fraction"]["estimate"] == pytest.approx(0.01)
    assert report["loader_over_torchvision"]["estimate"] == pytest.approx(20)


def apex_wheel(folder, amp: bool) -> str:
    """A python-only wheel named as apex 25.04's, with or without an apex.amp package."""
    import zipfile

    dist = "apex-0.1.dist-info"
    files = {
        "apex/__init__.py": "",
        **({"apex/amp/__init__.py": ""} if amp else {}),
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: apex\nVersion: 0.1\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    path = os.path.join(folder, "apex-0.1-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr(f"{dist}/RECORD", "".join(f"{n},,\n" for n in [*files, f"{dist}/RECORD"]))
    return path


# What a lent GPU machine sends back: at most 8 files under $OUT, and its output's last 12,000
# characters.
MAX_FILES, TAIL = 8, 12_000


def gpu_check_cpu(tmp_path, amp: bool, command=AMPCOMPARE) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "AMPCOMPARE": " ".join(command),
        "APEX_WHEEL": apex_wheel(tmp_path, amp),
        "WORK": str(tmp_path / "work"),
        "OUT": str(tmp_path / "out"),
    }
    return subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--cpu"],
        cwd=os.path.dirname(os.path.dirname(__file__)),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_gpu_check_runs_every_step_in_its_cpu_mode_and_packs_what_comes_back(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = gpu_check_cpu(tmp_path, amp=True)
    tail = proc.stdout[-TAIL:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Every step ran: the report of all the compares and the targets.
    assert (work / "report" / "benchmark.png").exists()
    assert (
        "apex (O2: fp16 model, fp32 master weights)"
        in (work / "report" / "report.md").read_text()
    )
    targets = (work / "targets.txt").read_text()
    assert "plain       bf16-mixed speed " in targets and "activations 0.5" in targets
    assert "Reference: the benchmark this tool grew from" in targets
    # What comes back: the archive and a few small files beside it.
    sent = [p for p in out.rglob("*") if p.is_file()]
    assert len(sent) <= MAX_FILES and (out / "gpu-check.tar.gz") in sent
    with tarfile.open(out / "gpu-check.tar.gz") as archive:
        names = archive.getnames()
    assert any(n.endswith("report/summary.json") for n in names)
    # plain at 32-true and bf16-mixed, the ladder's bf16-true and 16-true, 32-true with TF32 on,
    # the stand-ins of apex O2 and O3, and plain under FSDP in one process
    assert sum(n.endswith("result.json") for n in names) == 8
    assert not [n for n in names if n.endswith((".pt", ".lock")) or "/site/" in n]
    # The output ends with the summary: tests, compares, targets, verdict.
    summary = tail[tail.index("== gpu_check (cpu) summary ==") :]
    assert summary == (out / "summary.txt").read_text()
    assert "SKIPPED" in summary and " skipped" in summary  # the gpu tests, with their reasons
    assert (
        "-- compare: ok; ladder: ok (a rung diverged: its row says where); TF32: ok; "
        "apex O2 and O3: ok; FSDP: ok; report exit 0 --"
    ) in summary
    assert "runs: 8 planned, 8 recorded: 5 ok, 2 unavailable, 1 diverged" in summary
    assert "plain 16-true: diverged: loss is nan from step" in summary  # Adam's eps in fp16
    assert targets in summary
    last = summary.strip().splitlines()[-1]
    assert last.startswith("gpu_check (cpu): PASSED") and "apex: installed from" in last


def test_a_gpu_check_given_a_wheel_without_apex_amp_says_so_and_fails(tmp_path):
    """What a wheel does is the check's own part: every step around it runs as in the test
    above, so here each step's command is `true`, and the wheel's verdict is what is read."""
    proc = gpu_check_cpu(tmp_path, amp=False, command=["true"])
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_check (cpu): FAILED")
    assert "import apex.amp failed: ModuleNotFoundError: No module named 'apex.amp'" in last
    assert (tmp_path / "out" / "summary.txt").read_text().strip().splitlines()[-1] == last


def test_the_gpu_check_without_a_package_it_needs_stops_in_one_line(tmp_path):
    import venv

    venv.create(tmp_path / "bare", with_pip=False)  # a python without torch and the rest
    root = os.path.dirname(os.path.dirname(__file__))
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--cpu", str(tmp_path / "out")],
        cwd=root,
        env={
            **os.environ,
            "PYTHON": str(tmp_path / "bare" / "bin" / "python"),
            "WORK": str(tmp_path / "work"),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert (
        last.startswith("gpu_check (cpu): FAILED: cannot import torch")
        and "nothing was run" in last
    )
    assert last in (tmp_path / "out" / "env.txt").read_text()  # what comes back says it too
    assert not list((tmp_path / "work").glob("compare-*"))


def test_an_arm_that_raises_in_the_bench_is_reported_not_a_traceback(tmp_path, monkeypatch):
    import types
    from ampcompare import bench, bench_process

    def refuse(cfg):
        raise RuntimeError("refused on purpose")

    monkeypatch.setitem(bench_process.ARMS, "plain", types.SimpleNamespace(train=refuse))
    base = tiny(tmp_path, batch_size=64)
    measured = bench_process.small(base, str(tmp_path), 1, 1)
    assert measured == {"error": "RuntimeError: refused on purpose"}
    report = bench.pooled([{"small": measured}])
    assert report["bf16_over_fp32"] == {"error": "RuntimeError: refused on purpose"}


@pytest.mark.parametrize(
    "missing,unavailable", [("pytorch_lightning", True), ("record.results", False)]
)
def test_only_a_missing_framework_makes_an_arm_unavailable(
    monkeypatch, tmp_path, missing, unavailable
):
    import importlib

    from ampcompare import run as run_module
    from common.errors import COMPARE_CHILD, UNAVAILABLE_EXIT

    def broken(name):
        raise ImportError(f"cannot import name 'x' from '{missing}'", name=missing)

    monkeypatch.setattr(run_module.importlib, "import_module", broken)
    monkeypatch.setenv(COMPARE_CHILD, "1")  # as compare starts an arm
    r = CliRunner().invoke(
        cli, ["lightning", "--dataset", "synthetic", "--out-dir", str(tmp_path)]
    )
    monkeypatch.setattr(run_module.importlib, "import_module", importlib.import_module)
    if unavailable:  # said in one line, and compare records the arm as unavailable
        assert r.exit_code == UNAVAILABLE_EXIT and "cannot import its framework" in r.stderr
    else:  # this project's own code failing to import is a failure, never "unavailable"
        assert r.exit_code != UNAVAILABLE_EXIT and isinstance(r.exception, ImportError)
