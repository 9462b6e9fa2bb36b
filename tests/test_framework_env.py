"""What Lightning and Accelerate read from the environment never changes what an arm trains:
each such variable is cleared with one warning and kept in the record, or refused in one line
(record/framework_env.py). The decisions are tested as a table; a representative set runs
through the single-arm commands and through compare, against plain's weights."""

import json

import pytest
from click.testing import CliRunner

from ampcompare import analysis
from ampcompare.cli import cli
from record import framework_env
from tests.conftest import ARMS_ONLY, TINY_ARGS


@pytest.mark.parametrize(
    "environ,refused",
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "asks for DeepSpeed"),
        ({"ACCELERATE_USE_DEEPSPEED": "false"}, None),  # what `accelerate launch` leaves set
        ({"ACCELERATE_USE_FSDP": "1"}, "asks for FSDP through Accelerate"),
        ({"ACCELERATE_FP8_BACKEND": "TE"}, "asks Accelerate for fp8"),
        ({"LT_STRATEGY": "fsdp"}, "asks for a sharded strategy"),
        ({"PL_TRAINER_STRATEGY": "deepspeed_stage_2"}, "asks for a sharded strategy"),
        ({"LT_CLI_USED": "1"}, "a launch by `fabric run`"),
        ({"LT_DEVICES": "2", "PL_TRAINER_MAX_STEPS": "1"}, None),
    ],
)
def test_what_is_refused(environ, refused):
    line = framework_env.refusal(environ)
    assert (line is None) if refused is None else (refused in line and "unset it" in line)


def test_what_is_cleared_and_what_is_left():
    environ = {
        "PL_TRAINER_ACCUMULATE_GRAD_BATCHES": "2",
        "PL_GLOBAL_SEED": "7",
        "LT_DEVICES": "2",
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4",
        "ACCELERATE_DYNAMO_BACKEND": "inductor",
        "ACCELERATE_TORCH_DEVICE": "meta",
        "FSDP_SHARDING_STRATEGY": "1",
        "ACCELERATE_LOG_LEVEL": "info",  # logging only: left
        "RANK": "0",  # a launcher's: common/ranks.py decides
        "PATH": "/bin",
    }
    found = framework_env.scrub(environ)
    assert sorted(found) == [
        "ACCELERATE_DYNAMO_BACKEND",
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
        "ACCELERATE_TORCH_DEVICE",
        "FSDP_SHARDING_STRATEGY",
        "LT_DEVICES",
        "PL_GLOBAL_SEED",
        "PL_TRAINER_ACCUMULATE_GRAD_BATCHES",
    ]
    assert (
        "ACCELERATE_LOG_LEVEL" in environ and "RANK" in environ and "LT_DEVICES" not in environ
    )
    # a process this one starts finds nothing to clear, and still knows what was
    child = dict(environ)
    assert framework_env.scrub(child, child=True) == {}
    assert framework_env.inherited(child)["LT_DEVICES"] == "2"
    # a command run afresh in the same process (not a child) records only its own
    assert framework_env.scrub(environ) == {} and framework_env.inherited(environ) == {}


def weights(tmp_path, impl, env, *extra):
    r = CliRunner().invoke(
        cli,
        [
            impl,
            *TINY_ARGS,
            "--optimizer",
            "sgd",
            "--out-dir",
            str(tmp_path),
            "--run-id",
            impl,
            *extra,
        ],
        env=env,
    )
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / impl / "result.json").read_text())
    return record, r.stderr


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """The plain loop's record with nothing in the environment: what every arm must match."""
    return weights(tmp_path_factory.mktemp("plain"), "plain", {})[0]


@pytest.mark.parametrize(
    "impl,variable,value",
    [
        ("accelerate", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4"),
        ("accelerate", "ACCELERATE_DYNAMO_BACKEND", "inductor"),
        ("lightning", "PL_TRAINER_ACCUMULATE_GRAD_BATCHES", "2"),
        ("lightning", "PL_TRAINER_MAX_STEPS", "1"),
        ("fabric", "LT_DEVICES", "2"),
        ("fabric", "LT_PRECISION", "bf16-mixed"),
    ],
)
def test_an_arm_trains_what_its_record_says_whatever_the_environment(
    tmp_path, plain_run, impl, variable, value
):
    plain = plain_run
    arm, stderr = weights(tmp_path / "arm", impl, {variable: value})
    assert arm["status"] == "ok" and arm["weights_sha256"] == plain["weights_sha256"]
    assert arm["step_losses"] == plain["step_losses"]
    assert f"ampcompare: warning: cleared {variable}={value}" in stderr
    assert arm["env"]["cleared_environment"] == {variable: value}
    assert plain["env"]["cleared_environment"] == {}


def test_a_refused_variable_is_one_line_and_exit_2(tmp_path):
    r = CliRunner().invoke(
        cli,
        ["accelerate", *TINY_ARGS, "--out-dir", str(tmp_path)],
        env={"ACCELERATE_USE_DEEPSPEED": "true"},
    )
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "asks for DeepSpeed" in lines[0]
    assert not list(tmp_path.iterdir())


def test_compare_clears_for_every_arm_and_records_it(tmp_path):
    r = CliRunner().invoke(
        cli,
        [
            "compare",
            *TINY_ARGS[:-3],  # without --precision 32 --quiet: compare sets them
            "--epochs",
            "1",
            "--impls",
            "plain,lightning,accelerate",
            "--precisions",
            "32",
            *ARMS_ONLY,
            "--out-dir",
            str(tmp_path),
        ],
        env={
            "PL_TRAINER_ACCUMULATE_GRAD_BATCHES": "2",
            "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4",
        },
    )
    assert r.exit_code == 0, r.output
    assert r.stderr.count("ampcompare: warning: cleared") == 1
    records = analysis.load([str(tmp_path)])
    assert len(records) == 3 and {x.status for x in records} == {"ok"}
    assert len({x.weights_sha256 for x in records}) == 1
    for x in records:
        assert sorted(x.env["cleared_environment"]) == [
            "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
            "PL_TRAINER_ACCUMULATE_GRAD_BATCHES",
        ]


LAUNCH = {
    "RANK": "1",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "2",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29555",
}


@pytest.mark.parametrize(
    "launcher,says",
    [({}, True), ({"TORCHELASTIC_RUN_ID": "x"}, False), ({"AMPCOMPARE_LAUNCHER": "1"}, False)],
)
def test_a_process_no_launcher_we_know_started_says_its_error(launcher, says):
    # Rank 1 of a launch whose first process no one can vouch for (a launcher's variables
    # left in a shell, an unknown launcher) speaks; under torchrun or ours, local rank 0 does.
    r = CliRunner().invoke(cli, ["plain", "--epochs", "0"], env={**LAUNCH, **launcher})
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2
    assert lines == (
        ["ampcompare: error (rank 1 of 2): --epochs must be >= 1, not 0"] if says else []
    )


@pytest.mark.parametrize(
    "value,threads",
    [("2,1", 2), (" 3 ", 3), ("2,abc", None), ("２", None), ("2,0", None), ("0", None)],
)
def test_omp_num_threads_is_read_whole_as_openmp_reads_it(monkeypatch, value, threads):
    from common import ranks

    monkeypatch.setenv("OMP_NUM_THREADS", value)
    if threads is None:
        with pytest.raises(ValueError, match="is not a number of threads"):
            ranks.threads()
    else:
        assert ranks.threads() == threads
