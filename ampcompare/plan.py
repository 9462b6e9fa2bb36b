"""A comparison's plan: which arms run, in which order, with which options, into which folder.

A plan is made fresh from the command line, or read back from the compare.json of a comparison
that stopped (`compare --resume DIR`), where an option given again must agree with it. Either
way it is checked here, before anything runs; compare.py then runs it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from typing import Optional

import numpy as np

from common import config as config_module
from record import files
from record import results, schema
from common.config import INT_MAX, Config
from common.errors import UsageError
from common.precision import CANONICAL, OPT_LEVELS, SHARDED_ONLY

PLAN = "compare.json"
# The compare options a plan keeps beside its Config, as the command line spells them.
KEYS = ("impls", "precisions", "repeats", "seeds", "control")


@dataclass
class Arm:
    impl: str
    precision: str
    repeat: int
    seed: int = 0
    seeded: bool = False  # several seeds: the seed is part of the run's name
    control: bool = False  # the plain loop once more: the comparison's noise floor
    position: int = 0  # its place in its repeat's order
    ddp: bool = False  # the plain loop under DDP beside an FSDP comparison: its baseline

    @property
    def run_id(self) -> str:
        seed = f"-s{self.seed}" if self.seeded else ""
        role = "-control" if self.control else "-ddp" if self.ddp else ""
        return f"{self.impl}{role}-{self.precision}{seed}-r{self.repeat}"

    def options(self, cfg: Config) -> Config:
        """The comparison's options as this arm runs them: a DDP baseline's strategy."""
        return dataclasses.replace(cfg, strategy="ddp") if self.ddp else cfg


def schedule(
    impls, precisions, repeats, seeds=(0,), control=False, key="", ddp=False
) -> list[Arm]:
    """Every (impl, precision, seed), with `control` plain once more at each precision and
    seed, and with `ddp` plain under DDP at each (a rung only FSDP has left out), once per
    repeat, each repeat in the order of one row of a balanced Latin square:
    over the repeats every arm takes every place in the order equally often (exactly, over
    each whole number of rows), and no arm always follows the same one. `key` seeds which
    rows and which arm is which symbol, so that a plan read back runs the same order."""
    arms = [(i, p, s, False, False) for s in seeds for p in precisions for i in impls]
    if control:
        arms += [("plain", p, s, True, False) for s in seeds for p in precisions]
    if ddp:
        arms += [
            ("plain", p, s, False, True)
            for s in seeds
            for p in precisions
            if p not in SHARDED_ONLY
        ]
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8]))
    order = []
    for r, row in enumerate(balanced_orders(len(arms), repeats, rng)):
        for position, k in enumerate(row):
            i, p, s, c, d = arms[k]
            order.append(Arm(i, p, r, s, len(seeds) > 1, c, position, d))
    return order


def balanced_orders(n: int, rows: int, rng: np.random.Generator) -> list[list[int]]:
    """`rows` orders of 0..n-1 from a Williams square (a Latin square whose rows, for an even
    n, put every item right after every other exactly once; for an odd n its mirror image
    follows it), with its rows and symbols shuffled by rng."""
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    square = [[(x + r) % n for x in first] for r in range(n)]
    blocks = [square] if n % 2 == 0 else [square, [row[::-1] for row in square]]
    symbols = rng.permutation(n)
    sequence = [block[i] for block in blocks for i in rng.permutation(n)]
    return [[int(symbols[x]) for x in sequence[r % len(sequence)]] for r in range(rows)]


@dataclass(frozen=True)
class Plan:
    cfg: Config  # every arm's options but its impl, precision, seed and repeat
    impls: tuple
    precisions: tuple
    repeats: int
    seeds: int  # seeds cfg.seed, cfg.seed + 1, ...
    folder: Optional[str] = None  # None until the comparison has one
    control: bool = False  # plain once more at each precision: the report's noise floor

    def arms(self) -> list[Arm]:
        seeds = range(self.cfg.seed, self.cfg.seed + self.seeds)
        key = json.dumps([self.spelled(), self.cfg.seed])
        ddp = self.cfg.strategy == "fsdp" and self.cfg.devices > 1
        return schedule(
            self.impls, self.precisions, self.repeats, seeds, self.control, key, ddp
        )

    def spelled(self) -> dict:
        """The compare options as the command line gives them."""
        return {
            "impls": ",".join(self.impls),
            "precisions": ",".join(self.precisions),
            "repeats": self.repeats,
            "seeds": self.seeds,
            "control": self.control,
        }


def fresh(
    cfg: Config, impls, precisions, repeats: int, seeds: int, control: bool = True
) -> Plan:
    """A new comparison's plan, once compare can run it."""
    if cfg.num_nodes > 1:
        raise UsageError(
            f"compare --num-nodes {cfg.num_nodes}: compare starts its arms on this "
            f"node only; run each arm on every node with torchrun (docs/devices.md) and "
            f"gather the folders with report"
        )
    if cfg.opt_level is not None:
        if "apex" not in impls:
            raise UsageError(f"--opt-level {cfg.opt_level} is apex's; --impls has no apex")
        if not any(applies(cfg.opt_level, p) for p in precisions):
            raise UsageError(
                f"--opt-level {cfg.opt_level} runs none of --precisions "
                f"{','.join(precisions)} (O0: 32-true; O1, O2: 16-mixed; O3: 16-true)"
            )
    sharded_only = [p for p in precisions if p in SHARDED_ONLY]
    if sharded_only and cfg.strategy != "fsdp":
        raise UsageError(
            f"--precisions {','.join(sharded_only)}: FSDP's own mixed precision needs "
            f"--strategy fsdp"
        )
    plan = Plan(cfg, tuple(impls), tuple(precisions), repeats, seeds, None, control)
    return _seeded(plan)


def resumed(stored: Plan, asked: dict, cfg: Config) -> Plan:
    """The stopped comparison's plan, with the options given again (`asked`: name → value, of
    the compare options and Config fields on the command line) and `cfg`, the stored config
    with those applied. An option that may not change and differs is refused."""
    for name, value in asked.items():
        was = stored.spelled().get(name)
        if name in KEYS and value != was:
            given = _switch(name, value) if isinstance(value, bool) else f"--{name} {value}"
            was = _switch(name, was) if isinstance(was, bool) else was
            raise UsageError(
                f"--resume {stored.folder}: {given} differs from the comparison's {was}; "
                f"drop it to finish that one"
            )
    for name in sorted(asked.keys() - set(KEYS) - set(may_change())):
        value, was = getattr(cfg, name), getattr(stored.cfg, name)
        if value != was:
            raise UsageError(
                f"--resume {stored.folder}: {config_module.spelled(name, value)} differs "
                f"from the comparison's {config_module.spelled(name, was)}; drop it to "
                f"finish that one"
            )
    cfg = dataclasses.replace(cfg, out_dir=stored.cfg.out_dir, resume=None).validate()
    return _seeded(dataclasses.replace(stored, cfg=cfg))


def _switch(name: str, on: bool) -> str:
    return f"--{name}" if on else f"--no-{name}"


def may_change() -> tuple:
    """Options that compare --resume may change: as for a run, but its arms keep their
    --epochs (config.py declares which)."""
    c = config_module
    return c.names(resume=(c.FREE, c.FOLDER))


def _seeded(plan: Plan) -> Plan:
    if plan.cfg.seed + plan.seeds - 1 > INT_MAX:
        raise UsageError(
            f"--seed {plan.cfg.seed} with --seeds {plan.seeds} goes past {INT_MAX}"
        )
    return plan


def applies(opt_level, precision: str) -> bool:
    """Whether compare's --opt-level is the one for apex's arm at this precision (O2 for
    16-mixed, say); the other apex arms run their default (O0 for 32-true)."""
    return opt_level is not None and OPT_LEVELS[opt_level] == precision


# --- compare.json ----------------------------------------------------------------------------


def start(plan: Plan) -> Plan:
    """Give a fresh plan its folder under --out-dir, with its compare.json."""
    folder = new_folder(plan.cfg.out_dir)
    record = {
        "schema": results.SCHEMA,
        "config": plan.cfg.to_dict(),
        "impls": list(plan.impls),
        "precisions": list(plan.precisions),
        "repeats": plan.repeats,
        "seeds": plan.seeds,
        "control": plan.control,
    }
    try:
        files.write_json(os.path.join(folder, PLAN), record)
    except OSError as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise UsageError(f"cannot start a comparison in {folder}: {e.strerror}") from None
    return dataclasses.replace(plan, folder=folder)


def read(folder: str, impls) -> Plan:
    """The plan in folder's compare.json, checked as the command line checks options (impls:
    the implementations this tool has)."""
    path = os.path.join(folder, PLAN)
    if not os.path.isfile(path):
        raise UsageError(f"--resume {folder}: not a compare folder (no {PLAN} there)")
    try:
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
        newer = results.newer_schema(stored.get("schema"))
        if newer:
            raise UsageError(f"--resume {folder}: its {PLAN} was {newer}")
        stored.setdefault("seeds", 1)
        stored.setdefault("control", False)  # a comparison from before the control arm
        why = _damage(stored, impls)
    except (OSError, ValueError, AttributeError, RecursionError) as e:
        why = type(e).__name__
    if why:
        raise UsageError(f"--resume {folder}: its {PLAN} is damaged ({why})")
    return Plan(
        Config(**stored["config"]),
        tuple(stored["impls"]),
        tuple(stored["precisions"]),
        stored["repeats"],
        stored["seeds"],
        folder,
        stored["control"],
    )


def _damage(stored, impls) -> Optional[str]:
    if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict):
        return "no config"
    number = stored.get("schema", 1)  # a whole number: 99.0 or "99" is no schema of ours
    if type(number) is not int or number < 1:
        return f"schema: {schema.shown(repr(number))}"
    for key, allowed in (("impls", impls), ("precisions", CANONICAL)):
        names = stored.get(key)
        if not isinstance(names, list) or not names or not set(names) <= set(allowed):
            return f"{key}: {names!r}"
    if not isinstance(stored.get("control"), bool):
        return f"control: {stored.get('control')!r}"
    for key in ("repeats", "seeds"):
        if type(stored.get(key)) is not int or not 1 <= stored[key] <= 1000:
            return f"{key}: {stored.get(key)!r}"
    known = {f.name for f in dataclasses.fields(Config)}
    if not set(stored["config"]) <= known:
        return f"unknown options {sorted(set(stored['config']) - known)}"
    try:
        cfg = Config(**stored["config"])
        cfg.validate()
    except (UsageError, TypeError, AttributeError) as e:
        return f"config: {e}"
    try:  # together, as a new comparison's are checked (bf16-fsdp without fsdp, say)
        fresh(cfg, *(stored[k] for k in ("impls", "precisions", "repeats", "seeds", "control")))
    except UsageError as e:
        return str(e)
    return None


def new_folder(out_dir: str) -> str:
    """compare-<time>, or compare-<time>-2, -3, ... when another compare took that second."""
    base = os.path.join(out_dir, f"compare-{results.timestamp()}")
    for n in range(1, 1000):
        folder = base if n == 1 else f"{base}-{n}"
        try:
            os.makedirs(folder, exist_ok=False)
            return folder
        except FileExistsError:
            continue
        except OSError as e:  # a full disk, a folder made read-only since it was checked
            raise UsageError(f"cannot start a comparison in {folder}: {e.strerror}") from None
    raise UsageError(f"cannot find a free folder name like {base} in --out-dir")
