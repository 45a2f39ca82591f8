"""study/lifecycle.py: a study folder's state and the one table of what each command may do there."""
import itertools
import shutil

import pytest

from study import lifecycle
from study.lifecycle import STATES, Command, decide
from study.run import parse_args
from study.storage import Location

COMMANDS = [Command(verb, warm, no_retrain) for verb, warm, no_retrain
            in itertools.product(("start", "resume", "retrain"), (False, True), (False, True))] + [lifecycle.ANALYZE]
ARGV = ["space.yaml", "--storage", "res", "--warm-start", "results/old", "--num-samples", "3"]


def typed(cmd: Command) -> list[str]:
    """The command line a user types for `cmd`."""
    argv = ["space.yaml", "--storage", "res"] + (["--warm-start", "results/old"] if cmd.warm_start else [])
    return argv + [f for f, on in (("--resume", cmd.verb == "resume"), ("--retrain", cmd.verb == "retrain"),
                                   ("--no-retrain", cmd.no_retrain)) if on]


@pytest.mark.parametrize("state,cmd", list(itertools.product(STATES, COMMANDS)))
def test_every_refusal_advises_a_command_its_state_accepts(state, cmd):
    """No dead end: what a refusal tells the user to run is accepted in that same state, and the
    command line it prints means that command."""
    d = decide(state, cmd)
    assert d.action in lifecycle.ACTIONS
    if d.action != "refuse" or d.advice is None:
        return
    assert decide(state, d.advice).action != "refuse", (state, cmd, d)
    line = lifecycle.command_line(d.advice, typed(cmd), "res/x")
    if d.advice.verb == "analyze":
        assert line == "python -m study.analyze res/x"
        return
    args = parse_args(line.split()[3:])
    assert lifecycle.command(args) == d.advice, line
    assert lifecycle.refusal(d, typed(cmd), "res/x").endswith(line)


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("can_retrain", (True, False))
@pytest.mark.parametrize("argv", (ARGV, ARGV + ["--no-retrain"], ARGV + ["--resume"]))
def test_the_advice_after_an_interruption_is_accepted(state, can_retrain, argv):
    cmd = lifecycle.continuation(state, argv, can_retrain)
    if state == "foreign":  # no study.run leaves one: only another folder will do
        return
    assert decide(state, cmd).action != "refuse", (state, cmd)
    assert cmd.verb != "retrain" or can_retrain


def test_what_each_state_allows():
    """The table read as a user would: the one command that goes on, per state."""
    go_on = {s: [c for c in COMMANDS if decide(s, c).action not in ("refuse", "read")] for s in STATES}
    assert {c.verb for c in go_on["absent"]} == {c.verb for c in go_on["unstarted"]} == {"start"}
    assert {c.verb for c in go_on["interrupted"]} == {"resume"} and not go_on["foreign"]
    assert decide("interrupted", Command("resume", warm_start=True)).advice == Command("resume")
    assert decide("ended", Command("resume")).action == "nothing"
    assert decide("retrain_cut", Command("resume")).action == "finish_retrain"
    assert decide("retrain_cut", Command("resume", no_retrain=True)).action == "nothing"
    assert decide("ended", Command("retrain")).action == "retrain"


def test_the_state_of_real_folders(tiny_study, tmp_path):
    """Each state read off a folder: a real ended study, and what an interruption leaves of one."""
    ended, _ = tiny_study
    read = lambda p: lifecycle.read(Location.parse(str(p)))  # noqa: E731
    assert read(tmp_path / "none") == "absent"
    (tmp_path / "empty").mkdir()
    assert read(tmp_path / "empty") == "absent"
    assert read(ended) == "ended"
    cut = shutil.copytree(ended, tmp_path / "cut", ignore=shutil.ignore_patterns("report"))
    (cut / "retrain.pending").write_text("retrain\n")
    assert read(cut) == "retrain_cut"
    searching = shutil.copytree(ended, tmp_path / "searching", ignore=shutil.ignore_patterns("trials.*"))
    assert read(searching) == "interrupted"
    unstarted = tmp_path / "unstarted"
    unstarted.mkdir()
    for name in ("spec.yaml", "environment.yaml", "estimate.yaml", "warm_start.yaml"):
        shutil.copy(ended / "spec.yaml", unstarted / name)
    (unstarted / "ray").mkdir()  # Ray had made its folder, but saved nothing it can restore
    assert read(unstarted) == "unstarted"
    (unstarted / "notes.txt").write_text("mine")
    assert read(unstarted) == "foreign"
    # estimate.yaml is written before spec.yaml and the first trial: a Ctrl-C then leaves a folder
    # that the same command starts afresh, not one refused with and without --resume
    first = tmp_path / "first"
    first.mkdir()
    (first / "estimate.yaml").write_text("wall_s: 1\n")
    assert read(first) == "unstarted"
