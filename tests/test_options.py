"""An option is declared once, in config.py: what a resume, compare and report do with it
follows from its declaration. A test option added in a subclass of Config, as a new option
would be added, is treated by each as its flags say."""

import dataclasses

import pytest

from ampcompare import analysis, compare, plan
from common import config
from record import resume
from record.results import RunResult
from common.config import FREE, SAME
from common.errors import UsageError


def extended(monkeypatch, **flags):
    """Config with one more option, `--widget` (an int), declared with `flags`."""

    @dataclasses.dataclass
    class Extended(config.Config):
        widget: int = config.option(3, "A test option.", min=0, **flags)

    monkeypatch.setattr(config, "Config", Extended)
    return Extended


def stored_record(**config_values):
    return RunResult.from_dict(
        {
            "status": "interrupted",
            "error": None,
            "precision": {"requested": "32-true", "effective": "32-true"},
            "env": {},
            "config": {"epochs": 2, "schedule": "constant", **config_values},
            "checkpoint": None,
        }
    )


@pytest.mark.parametrize("how,refused", [(SAME, True), (FREE, False)])
def test_a_new_option_is_checked_on_resume_as_declared(monkeypatch, how, refused):
    extended(monkeypatch, resume=how)
    stored = stored_record(widget=3)
    given = {"epochs": 2, "schedule": "constant", "widget": 4}
    with pytest.raises(Exception) as e:  # refused for its value, or later for no checkpoint
        resume.check("here", stored, given, "plain", {}, None)
    assert ("--widget 4 differs from the stopped run's --widget 3" in str(e.value)) == refused


@pytest.mark.parametrize("per_arm", [False, True])
def test_compare_passes_a_new_option_to_its_arms_unless_it_sets_it_per_arm(
    monkeypatch, per_arm
):
    cls = extended(monkeypatch, per_arm=per_arm)
    args = compare.child_args(cls(widget=7))
    assert ("--widget" in args) == (not per_arm)
    if not per_arm:
        assert args[args.index("--widget") + 1] == "7"


@pytest.mark.parametrize("how,refused", [(SAME, True), (FREE, False)])
def test_compare_resume_checks_a_new_option_as_declared(monkeypatch, how, refused):
    cls = extended(monkeypatch, resume=how)
    stored = plan.Plan(cls(widget=3), ("plain",), ("32-true",), 1, 1, "/stopped")
    asked = {"widget": 4}
    if refused:
        said = "--widget 4 differs from the comparison's --widget 3"
        with pytest.raises(UsageError, match=said):
            plan.resumed(stored, asked, dataclasses.replace(stored.cfg, widget=4))
    else:
        assert (
            plan.resumed(stored, asked, dataclasses.replace(stored.cfg, widget=4)).cfg.widget
            == 4
        )


@pytest.mark.parametrize("setting", [True, False])
def test_report_groups_by_a_new_option_only_if_it_is_a_setting(monkeypatch, setting):
    extended(monkeypatch, setting=setting)

    def record(run_id, widget):
        return RunResult.from_dict(
            {
                "run_id": run_id,
                "impl": "plain",
                "seed": 0,
                "repeat": 0,
                "status": "ok",
                "precision": {"requested": "32-true", "effective": "32-true"},
                "opt_level": None,
                "config": {"widget": widget},
                "env": {"device": "cpu", "device_name": "CPU"},
                "epochs": [],
                "summary": {},
            }
        )

    groups = analysis.summarize([record("a", 1), record("b", 2)]).devices
    assert len(groups) == (2 if setting else 1)
    if setting:
        assert {g.device for g in groups} == {"CPU (cpu) — widget 1", "CPU (cpu) — widget 2"}
