"""Records and checkpoints that are not what they seem: a crash between the two renames of an
epoch's end, a record edited by hand, a checkpoint changed with its hash fixed up, records with
a key missing or of the wrong type. Each is resumed bitwise or refused in one line; the report
names a bad record and reports the rest."""

import json
import re

import pytest
import torch
from click.testing import CliRunner

from ampcompare import analysis
from ampcompare.cli import cli
from common.errors import UsageError
from record import checkpoints, results, resume
from record.results import RunResult
from plain_torch import train as plain
from tests import faults
from tests.conftest import TINY_ARGS, checkpoint_of, run_cli, tiny


def files(run_dir):
    return sorted(p.name for p in run_dir.iterdir())


@pytest.mark.parametrize("window,resumed_from", [("between", 1), ("committed", 2)])
def test_a_crash_at_either_rename_leaves_a_run_that_resumes_bitwise(
    tmp_path, monkeypatch, window, resumed_from
):
    # kill -9 (os._exit) after the new checkpoint got its name but before the record that
    # names it did; or after the record, before the old checkpoint went.
    straight = plain.train(tiny(tmp_path, run_id="straight", epochs=3))
    faults.inject_children(monkeypatch, epoch=1, action="exit", step=window)
    out = tmp_path / "runs"
    proc = run_cli(
        ["plain", *TINY_ARGS, "--epochs", "3", "--out-dir", str(out), "--run-id", "r"]
    )
    assert proc.returncode == 137, proc.stderr
    monkeypatch.delenv(faults.ENV)
    run_dir = out / "r"
    left = files(run_dir)
    assert "checkpoint-1.pt" in left and "checkpoint-2.pt" in left  # one of them named
    record = json.loads((run_dir / "result.json").read_text())
    assert record["checkpoint"]["epochs"] == resumed_from
    again = run_cli(["plain", "--resume", str(run_dir)])
    assert again.returncode == 0, again.stderr
    final = json.loads((run_dir / "result.json").read_text())
    assert final["status"] == "ok" and final["resumes"][0]["epoch"] == resumed_from
    assert final["step_losses"] == straight.step_losses
    assert final["weights_sha256"] == straight.weights_sha256
    assert files(run_dir) == [".lock", "checkpoint-3.pt", "result.json"]  # no leftovers


@pytest.fixture
def stopped(tmp_path, monkeypatch):
    """A plain run stopped after its first epoch, resumable."""
    with monkeypatch.context() as m:
        faults.inject(m, epoch=1, action="interrupt")
        plain.train(tiny(tmp_path, run_id="s", epochs=2))
    return tmp_path / "runs" / "s"


def edit(run_dir, change):
    path = run_dir / "result.json"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def refused(run_dir, fragment):
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    r = CliRunner().invoke(cli, ["plain", "--resume", str(run_dir)])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert lines[0].startswith("ampcompare: error: ") and fragment in lines[0], lines[0]
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before  # nothing written


def test_an_edited_option_in_the_record_is_refused(stopped):
    edit(stopped, lambda r: r["config"].update(lr=0.5))
    refused(stopped, "result.json says --lr 0.5, but checkpoint-1.pt was trained with 0.0001")


def test_changed_weights_with_their_hash_fixed_up_are_refused(stopped):
    path = checkpoint_of(stopped)
    state = torch.load(path, weights_only=True)
    name = next(iter(state["model"]))
    state["model"][name] = state["model"][name] + 1  # a byte of the weights, changed
    torch.save(state, path)
    edit(stopped, lambda r: r["checkpoint"].update(sha256=checkpoints.synced_sha256(path)))
    refused(stopped, "the weights in checkpoint-1.pt are not the ones result.json")


def test_a_checkpoint_the_record_names_that_is_not_there_is_refused(stopped):
    checkpoint_of(stopped).unlink()
    refused(stopped, "checkpoint-1.pt, which result.json names, is not there")


@pytest.mark.parametrize(
    "change,fragment",
    [
        (lambda r: r["config"].pop("epochs"), "config has no epochs"),
        (lambda r: r["checkpoint"].pop("sha256"), "checkpoint has no sha256"),
        (lambda r: r.update(resumes=5), "resumes is 5, not a list"),
        (
            lambda r: r["checkpoint"].update(epochs="1"),
            "checkpoint.epochs is '1', not an integer",
        ),
        (
            lambda r: r["checkpoint"].update(file="../../etc/passwd"),
            "checkpoint.file is '../../etc/passwd', not a checkpoint's file name",
        ),
        (lambda r: r.update(status="paused"), "status is 'paused', not one of"),
        (lambda r: r["config"].update(lr="fast"), "config.lr: --lr must be a float"),
        (lambda r: r.update(epochs=[None]), "epochs[0] is null, not an object"),
        # written twice, once at the top and once in config: the two must agree
        (lambda r: r.update(seed=7), "seed 7 disagrees with config.seed 0"),
        (lambda r: r.update(repeat=3), "repeat 3 disagrees with config.repeat 0"),
    ],
)
def test_a_record_missing_a_key_or_of_the_wrong_type_is_refused_in_one_line(
    stopped, change, fragment
):
    edit(stopped, change)
    refused(stopped, f"result.json is not a run record ({fragment}")


@pytest.mark.parametrize(
    "change,fragment",
    [
        (lambda r: r.pop("summary"), "has no summary"),
        (lambda r: r.update(seed=[1]), "seed is [1], not an integer"),
        (
            lambda r: r["env"].update(device_name=5),
            "env.device_name is 5, not a string or null",
        ),
        (lambda r: r["summary"].update(median_step_time_s="x"), "summary.median_step_time_s"),
        (lambda r: r["epochs"][0].update(step_times_s=["x"]), "epochs[0].step_times_s[0]"),
        # a size a report divides by: never negative, infinite or NaN
        (
            lambda r: r["summary"].update(model_state_bytes=-100),
            "summary.model_state_bytes is -100, not a count of bytes",
        ),
        (  # written as NaN: no record of ours holds one (strict JSON writes null)
            lambda r: r["epochs"][0]["model_state"].update(parameters=float("nan")),
            "not strict JSON (it holds NaN)",
        ),
        (  # a size no float holds, quoted short
            lambda r: r["summary"].update(activation_bytes=10**400),
            f"summary.activation_bytes is 1{'0' * 38}…, not a count of bytes",
        ),
        (
            lambda r: r["precision"].update(effective="17-true"),
            "precision.effective is '17-true', not one of",
        ),
        (
            lambda r: r["precision"].update(effective=None),
            "an ok run with no precision it ran",
        ),
    ],
)
def test_report_names_a_bad_record_and_reports_the_rest(tmp_path, change, fragment):
    for run_id in ("good", "bad"):
        plain.train(tiny(tmp_path, run_id=run_id, epochs=1))
    edit(tmp_path / "runs" / "bad", change)
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    assert "skipped" in r.stderr and "bad/result.json" in r.stderr and fragment in r.stderr
    rows = (tmp_path / "runs" / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and ",good," in rows[1]


def test_the_resume_check_is_a_function_of_values():
    # No file is read: the stored record, what the checkpoint holds, the options, the machine.
    stored = RunResult.from_dict(
        {
            "status": "interrupted",
            "error": None,
            "precision": {"requested": "32-true", "effective": "32-true"},
            "env": {"device": "cpu", "torch": "2"},
            "config": {"epochs": 2, "lr": 1e-4, "schedule": "constant"},
            "checkpoint": {
                "file": "checkpoint-1.pt",
                "epochs": 1,
                "sha256": "a" * 64,
                "weights_sha256": "b" * 64,
            },
        }
    )
    given = {"epochs": 2, "lr": 1e-4, "schedule": "constant"}
    env = {"device": "cpu", "torch": "2"}
    good = resume.Checkpoint("a" * 64, 1, dict(given), "b" * 64, "b" * 64)
    resume.check("here", stored, given, "plain", env, good)  # nothing to refuse
    cases = [
        (dict(given, lr=0.5), env, good, "--lr 0.5 differs"),
        (given, dict(env, torch="3"), good, "that run ran with torch 2"),
        (given, env, None, "is not there"),
        (
            given,
            env,
            resume.Checkpoint("c" * 64, 1, given, "b" * 64, "b" * 64),
            "does not match the SHA-256",
        ),
        (
            given,
            env,
            resume.Checkpoint("a" * 64, 1, dict(given, lr=1.0), "b" * 64, "b" * 64),
            "was trained with 1.0",
        ),
        (
            given,
            env,
            resume.Checkpoint("a" * 64, 1, given, "b" * 64, "d" * 64),
            "the weights in checkpoint-1.pt are not the ones",
        ),
        (
            given,
            env,
            resume.Checkpoint("a" * 64, 2, given, "b" * 64, "b" * 64),
            "holds 2 epochs",
        ),
        (dict(given, epochs=1), env, good, "--epochs may only be raised"),
    ]
    for options, machine, ckpt, fragment in cases:
        with pytest.raises(Exception) as e:
            resume.check("here", stored, options, "plain", machine, ckpt)
        assert fragment in str(e.value), (fragment, str(e.value))


def test_an_old_record_is_still_read_by_report(tmp_path):
    # schema 3: checkpoint.pt, no step times; report reads it, without step-time figures
    plain.train(tiny(tmp_path, run_id="old", epochs=1))
    path = tmp_path / "runs" / "old" / "result.json"
    record = json.loads(path.read_text())
    record["schema"] = 3
    record["checkpoint"]["file"] = "checkpoint.pt"
    for e in record["epochs"]:
        e.pop("step_times_s"), e.pop("step_waits_s"), e.pop("step_clock")
    path.write_text(json.dumps(record))
    (group,) = analysis.summarize(analysis.load([tmp_path / "runs"])).devices
    assert group.precisions["32-true"]["plain"].step_time_s is None


def test_a_record_reads_back_as_the_type_it_was_written_from(tmp_path):
    result = plain.train(tiny(tmp_path, run_id="r", epochs=1))
    read = RunResult.read(str(tmp_path / "runs" / "r"))
    assert read == result and read.precision.effective == "32-true"


def test_a_record_of_a_newer_schema_is_refused_in_one_line_naming_it(tmp_path):
    plain.train(tiny(tmp_path, run_id="new", epochs=1))
    path = tmp_path / "runs" / "new" / "result.json"
    record = json.loads(path.read_text())
    record["schema"] = results.SCHEMA + 1
    path.write_text(json.dumps(record))
    said = f"written by a newer ampcompare (schema {results.SCHEMA + 1}; this one reads 1 to"
    skipped = []
    assert analysis.load([tmp_path / "runs"], skipped) == []
    assert said in skipped[0][1]
    with pytest.raises(UsageError, match=re.escape(said)):
        resume.read_stopped(str(tmp_path / "runs" / "new"), "plain")


def test_json_nested_past_the_parser_is_not_valid_json_in_one_line(tmp_path):
    run_dir = tmp_path / "deep"
    run_dir.mkdir()
    (run_dir / "result.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(results.NotARecord, match="not valid JSON"):
        results.read_json(str(run_dir))
    r = CliRunner().invoke(cli, ["plain", "--resume", str(run_dir)])
    assert r.exit_code == 2 and "not valid JSON" in r.stderr and "Traceback" not in r.output
