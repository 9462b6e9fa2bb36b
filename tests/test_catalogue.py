"""The bad-input catalogue (docs/bad-input.md): every case goes through the real command line
and gets one line, exit 2, no traceback, and nothing written. A second test keeps that
catalogue and this table the same list.

Placeholders in a command: FILE is a file, STOPPED a plain run stopped after one of its three
epochs (EDITED: one whose record says another lr than its checkpoint; BROKEN: one whose record
has an unknown status), COMPARED a compare folder, EMPTY an empty folder, NOWHERE a path that
does not exist. A command may start with environment variables (VAR=value)."""

import importlib.util
import pathlib
import re
import shutil

import pytest
import torch
from click.testing import CliRunner

from ampcompare.cli import cli
from plain_torch import train as plain
from tests import faults
from tests.conftest import checkpoint_of, tiny

ROOT = pathlib.Path(__file__).resolve().parent.parent
CPU_RUN = "--dataset synthetic --model small --synthetic-size 64 --batch-size 32 --epochs 1"


def _apex_line():
    """What `ampcompare apex` says on this machine: apex missing, or CUDA missing."""
    if importlib.util.find_spec("apex") is None:
        return "apex is not installed (it is not on the package index)"
    if not torch.cuda.is_available():
        return "apex.amp needs a CUDA GPU"
    pytest.skip("apex and CUDA are both here: ampcompare apex runs")


def _no_cuda_line():
    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    return "no CUDA device is available here"


CASES = {
    # the options every run takes
    "ampcompare plain --precision fp8": "unknown precision 'fp8'",
    "ampcompare plain --precision 4-true": "unknown precision '4-true'",
    "ampcompare lightning --precision 64": "unknown precision '64'",
    "ampcompare plain --dataset imagenet": "'imagenet' is not one of 'cifar10', 'synthetic'",
    "ampcompare plain --model vit": "--model 'vit': not one of resnet18, small, linear, and "
    "not torchvision:NAME, timm:NAME or package.module:callable",
    "ampcompare plain --model torchvision:inception_v3": "needs inputs of at least 75x75 (torchvision's min_size)",
    "ampcompare plain --model nosuchmodule:build": "cannot import nosuchmodule (ModuleNotFoundError: No module named 'nosuchmodule')",
    "ampcompare plain --batch-size 0": "--batch-size must be >= 1, not 0",
    "ampcompare plain --batch-size 1e30": "'1e30' is not a valid integer",
    "ampcompare plain --batch-size 100000": "--batch-size must be <= 65536, not 100000",
    "ampcompare plain --epochs 0": "--epochs must be >= 1, not 0",
    "ampcompare plain --lr 0": "--lr must be > 0.0, not 0.0",
    "ampcompare plain --lr -1": "--lr must be > 0.0, not -1.0",
    "ampcompare plain --lr nan": "--lr must be a finite number, not nan",
    "ampcompare lightning --lr inf": "--lr must be a finite number, not inf",
    "ampcompare plain --clip-grad nan": "--clip-grad must be a finite number, not nan",
    "ampcompare plain --clip-grad -1": "--clip-grad must be >= 0.0, not -1.0",
    "ampcompare plain --seed -1": "--seed must be >= 0, not -1",
    "ampcompare plain --seed 1e20": "'1e20' is not a valid integer",
    "ampcompare plain --seed 99999999999": "--seed must be <= 2147483647, not 99999999999",
    "ampcompare plain --synthetic-size 1e12": "'1e12' is not a valid integer",
    "ampcompare plain --synthetic-size 2000000": "--synthetic-size must be <= 1000000",
    "ampcompare plain --num-workers -1": "--num-workers must be >= 0, not -1",
    "ampcompare plain --limit-train-batches 0": "--limit-train-batches must be >= 1, not 0",
    "ampcompare plain --devices 0": "--devices must be >= 1, not 0",
    "ampcompare plain --devices 65": "--devices must be <= 64, not 65",
    "ampcompare plain --num-nodes 0": "--num-nodes must be >= 1, not 0",
    "ampcompare plain --devices 2 --batch-size 33": "--batch-size 33 does not split evenly over 2 processes",
    "ampcompare plain --devices 2 --num-nodes 2": "start the job on each node with torchrun",
    "ampcompare apex --devices 2": _apex_line,
    "ampcompare plain --strategy zero3": "'zero3' is not one of 'ddp', 'fsdp'",
    "ampcompare plain --precision bf16-fsdp": "--precision bf16-fsdp is FSDP's own mixed precision (its MixedPrecisionPolicy): it needs --strategy fsdp",
    "ampcompare plain --strategy fsdp --channels-last": "--channels-last with --strategy fsdp: FSDP2 shards only contiguous parameters",
    "ampcompare apex --strategy fsdp": "apex: --strategy fsdp: apex.amp predates sharded data parallel",
    "ampcompare lightning --devices 2 --strategy fsdp --precision 16-mixed": "lightning: --strategy fsdp at 16-mixed: its ModelParallelStrategy allows 32-true, bf16-mixed, bf16-true, 16-true",
    "ampcompare compare --precisions 32,bf16-fsdp": "--precisions bf16-fsdp: FSDP's own mixed precision needs --strategy fsdp",
    "ampcompare plain --accelerator tpu": "'tpu' is not one of 'auto', 'cpu', 'cuda'",
    "ampcompare plain --accelerator cuda": _no_cuda_line,
    "ampcompare plain --opt-level O1": "No such option '--opt-level'",
    "ampcompare plain --foo": "No such option '--foo'",
    "ampcompare train": "No such command 'train'",
    # where things are read and written
    "ampcompare plain --dataset cifar10 --no-download --data-dir EMPTY": "is not there; run with --download, or use --dataset synthetic",
    "ampcompare plain --data-dir ''": "--data-dir must name a folder, not ''",
    "ampcompare plain --out-dir ''": "--out-dir must name a folder, not ''",
    "ampcompare plain --out-dir FILE/runs": "is not a writable folder",
    "ampcompare plain --run-id ../x": "--run-id '../x': use a plain folder name",
    "ampcompare plain --run-id /tmp/x": "--run-id '/tmp/x': use a plain folder name",
    "ampcompare plain --run-id ''": "--run-id '': use a plain folder name",
    "ampcompare plain --run-id STOPPED_NAME --out-dir STOPPED_PARENT": "already exists",
    # resuming
    "ampcompare plain --resume NOWHERE": "no such folder",
    "ampcompare plain --resume EMPTY": "cannot read its result.json",
    "ampcompare lightning --resume STOPPED": "is a plain run",
    "ampcompare plain --resume STOPPED --lr 0.5": "--lr 0.5 differs from the stopped run's",
    # a precision's own warning (fp16 on a CPU) does not come before a refusal's one line
    "ampcompare plain --resume STOPPED --precision 16-true": "--precision 16-true differs",
    "ampcompare plain --resume STOPPED --epochs 2": "--epochs may only be raised",
    "ampcompare plain --resume STOPPED --run-id x": "drop --run-id",
    "ampcompare plain --resume TAMPERED": "checkpoint-1.pt does not match the SHA-256",
    "ampcompare plain --resume EDITED": "result.json says --lr 0.5, but checkpoint-1.pt was trained with 0.0001",
    "ampcompare plain --resume BROKEN": "result.json is not a run record (status is 'paused', not one of",
    "OMP_NUM_THREADS=abc ampcompare plain --devices 2 --batch-size 32": "OMP_NUM_THREADS='abc' is not a number of threads",
    # apex
    "ampcompare apex --precision bf16": "apex.amp has no bf16 mode",
    "ampcompare apex --precision 32 --opt-level O1": "--opt-level O1 runs 16-mixed",
    "ampcompare apex --opt-level O4": "'O4' is not one of 'O0', 'O1', 'O2', 'O3'",
    "ampcompare apex": _apex_line,
    # compare and report
    "ampcompare compare --impls plain,tensorflow": "--impls: tensorflow; choose from",
    "ampcompare compare --precisions 32,fp8": "--precisions: fp8; choose from",
    "ampcompare compare --repeats 0": "'--repeats': 0 is not in the range 1<=x<=1000",
    "ampcompare compare --dataset cifar10 --no-download --data-dir EMPTY": "is not there; run with --download, or use --dataset synthetic",
    "ampcompare compare --num-nodes 2": "compare starts its arms on this node only",
    "ampcompare compare --impls plain --opt-level O2": "--opt-level O2 is apex's; --impls has no",
    "ampcompare compare --precisions 32 --opt-level O2": "--opt-level O2 runs none of --precisions",
    "ampcompare compare --resume EMPTY": "not a compare folder (no compare.json there)",
    "ampcompare compare --resume COMPARED --impls lightning": "--impls lightning differs",
    "ampcompare report NOWHERE": "Directory 'NOWHERE' does not exist",
    "ampcompare report EMPTY": "no readable run record under",
    "ampcompare report STOPPED_PARENT --out FILE": "is a file; name a folder",
    "ampcompare calibrate EMPTY": "calibrate needs ≥ 6 ok runs of one arm at one precision",
    "ampcompare calibrate COMPARED": "calibrate needs ≥ 6 ok runs of one arm at one precision",
    "ampcompare calibrate EMPTY --splits 0": "0 is not in the range 1<=x<=100000",
    "ampcompare calibrate EMPTY --slowdown -1": "-1.0 is not in the range 0.0<=x<=10.0",
    "ampcompare plain --role judge": "'judge' is not one of 'arm', 'control'",
    "ampcompare calibrate EMPTY --slowdown nan": "nan is not a finite number",
    "ampcompare fabric --role control": "--role control: a comparison's control is the plain "
    "loop run once more; fabric runs as an arm (--role arm)",
    "ampcompare bench --processes 0": "0 is not in the range 1<=x<=100",
    "ampcompare bench --rounds 1": "1 is not in the range 2<=x<=1000",
    "ampcompare bench --accelerator cuda": _no_cuda_line,
    "ACCELERATE_USE_DEEPSPEED=true ampcompare accelerate": "asks for DeepSpeed, which "
    "ampcompare does not run; unset it",
    "LT_STRATEGY=fsdp ampcompare fabric": "asks for a sharded strategy",
    "ACCELERATE_LOG_LEVEL=bogus ampcompare accelerate": "is not a logging level",
    "ACCELERATE_FP8_BACKEND=TE ampcompare compare": "asks Accelerate for fp8",
    "ampcompare plain --model sys:exit": "building it ended the process (sys.exit(None)); a "
    "model must not exit",
}


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("catalogue")
    mp = pytest.MonkeyPatch()
    faults.inject(mp, epoch=1, action="interrupt")
    plain.train(tiny(tmp, run_id="stopped", epochs=3))
    plain.train(tiny(tmp, run_id="tampered", epochs=3))
    mp.undo()
    ckpt = checkpoint_of(tmp / "runs" / "tampered")
    ckpt.write_bytes(ckpt.read_bytes()[:-10])
    for name, change in (
        ("edited", ('"lr": 0.0001', '"lr": 0.5')),
        ("broken", ('"status": "interrupted"', '"status": "paused"')),
    ):
        shutil.copytree(tmp / "runs" / "stopped", tmp / "edited" / name)
        record = tmp / "edited" / name / "result.json"
        assert change[0] in record.read_text()
        record.write_text(record.read_text().replace(*change))
    (tmp / "compared").mkdir()
    (tmp / "compared" / "compare.json").write_text(
        '{"config": {}, "impls": ["plain"], "precisions": ["32-true"], "repeats": 1, '
        '"seeds": 1}'
    )
    (tmp / "a-file").write_text("not a folder")
    return {
        "STOPPED_PARENT": tmp / "runs",
        "STOPPED_NAME": "stopped",
        "STOPPED": tmp / "runs" / "stopped",
        "TAMPERED": tmp / "runs" / "tampered",
        "EDITED": tmp / "edited" / "edited",
        "BROKEN": tmp / "edited" / "broken",
        "COMPARED": tmp / "compared",
        "FILE": tmp / "a-file",
        "NOWHERE": tmp / "nowhere",
    }


def snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", list(CASES))
def test_bad_input_gets_one_line_exit_2_and_writes_nothing(command, places, tmp_path):
    expected = CASES[command]
    expected = expected() if callable(expected) else expected
    empty = tmp_path / "empty"
    empty.mkdir()
    names = {**places, "EMPTY": empty}
    words = command.split()
    env = dict(w.split("=", 1) for w in words[: words.index("ampcompare")])
    args = words[words.index("ampcompare") + 1 :]
    args = [
        re.sub(r"[A-Z_]{4,}", lambda m: str(names.get(m.group(0), m.group(0))), a) for a in args
    ]
    args = ["" if a == "''" else a for a in args]
    if args[0] in ("plain", "lightning", "apex", "compare") and "--resume" not in args:
        defaults = CPU_RUN.split()
        given = {a for a in args if a.startswith("--")}
        for i in range(0, len(defaults), 2):  # fill in a tiny run for what the case leaves out
            if defaults[i] not in given:
                args += defaults[i : i + 2]
        if "--out-dir" not in given:
            args += ["--out-dir", str(tmp_path / "out")]
        if args[0] == "compare":
            args.remove("--epochs"), args.remove("1")
    watched = places["STOPPED_PARENT"].parent
    before = snapshot(watched)
    result = CliRunner().invoke(cli, args, env=env)
    assert result.exit_code == 2, (args, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ampcompare: error: "), result.stderr
    assert expected.replace("NOWHERE", str(places["NOWHERE"])) in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and not any(empty.iterdir())
    assert snapshot(watched) == before


def readme_catalogue():
    section = (ROOT / "docs" / "bad-input.md").read_text()
    return re.findall(r"^\| `((?:[A-Z0-9_]+=\S+ )*ampcompare [^`]*)` \|", section, flags=re.M)


def test_the_readme_catalogue_is_this_table():
    documented = readme_catalogue()
    assert len(documented) == len(set(documented))
    missing = [c for c in CASES if c not in documented]
    untested = [c for c in documented if c not in CASES]
    assert not missing, f"tested but not in the catalogue in docs/bad-input.md: {missing}"
    assert not untested, f"in the catalogue in docs/bad-input.md but not tested: {untested}"
