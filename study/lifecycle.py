"""A study folder's state, read once, and what each command may do in it: one table.

`study.run` reads the folder (`read`), looks the command up (`decide`) and either acts or
prints the refusal, which names the command to run instead. The line after a Ctrl-C
(`next_step`) and the dry run's line come from the same table, so no message can advise
a command that the table refuses (tests/test_lifecycle.py walks every pair).
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from study.storage import Location

# what each state means, as the messages say it
STATES = {
    "absent": "no study yet",
    "foreign": "files that are not a study's",
    "unstarted": "only what a run writes before Ray records its first trial",
    "interrupted": "a study whose search has not ended",
    "ended": "an ended study",
    "retrain_cut": "an ended study whose retrain was cut short",
}
# What a run writes before Ray records its first trial: a folder holding only these (and
# no restorable Ray state) is started afresh rather than refused.
LEFTOVERS = ("spec.yaml", "environment.yaml", "optuna.db", "ray", "estimate.yaml", "warm_start.yaml", "report")
LOCK = "study.lock"  # the one process that writes the folder: its host, pid and command
LOG = "study.log"  # Ray's and Optuna's own log lines (study.run --verbose prints them instead)
RETRAIN_PENDING = "retrain.pending"  # from the search's export until its retrain has ended (or a --retrain's)
TABLES = ("trials.parquet", "trials.csv")  # either one: the search ended and was exported
EXPORT = ("history.csv", *TABLES)  # what the export writes, trials.csv last (best.yaml before them)


def read(d: Location) -> str:
    """The state of study folder `d` (a local folder or a URI), from what it holds."""
    if d.is_empty_dir():
        return "absent"
    names = {Path(i.path).name for i in d.fs.get_file_info(pafs.FileSelector(d.path))} - {LOCK, LOG}
    if not names:
        return "absent"
    ray = "ray" in names and "spec.yaml" in names and restorable(d / "ray")
    # An export cut short (killed between its files) is not an ended study: --resume, whose Ray
    # Tune has nothing left to run, exports again. A table without Ray's state is read as written.
    if "spec.yaml" in names and names & set(TABLES) and (set(EXPORT) <= names or not ray):
        return "retrain_cut" if RETRAIN_PENDING in names else "ended"
    if ray:
        return "interrupted"
    if all(n in LEFTOVERS or n == LOCK or n.startswith(".storage-check-") or n.endswith(".tmp") for n in names):
        return "unstarted"
    return "foreign"


def restorable(ray_dir: Location) -> bool:
    """Whether Ray Tune can continue the run recorded in `ray_dir` (the search's ray/, a retrain's
    folder): its Tuner state (tuner.pkl, not empty: a crash while Ray wrote it left 0 bytes) and a
    saved experiment state (before Ray's first save, a restore starts with no trials and misbehaves:
    a retrain's trials came back without their seed). Else that run never recorded a trial, and it
    starts afresh."""
    info = {Path(i.path).name: i for i in ray_dir.fs.get_file_info(pafs.FileSelector(ray_dir.path,
                                                                                     allow_not_found=True))}
    tuner = info.get("tuner.pkl")
    return (tuner is not None and tuner.type == pafs.FileType.File and (tuner.size or 0) > 0
            and any(n.startswith("experiment_state") and n.endswith(".json") for n in info))


@dataclass(frozen=True)
class Command:
    """What was asked: a study.run verb and the flags that change what it may do, or study.analyze."""

    verb: str  # start, resume, retrain, analyze
    warm_start: bool = False
    no_retrain: bool = False


@dataclass(frozen=True)
class Decision:
    action: str  # search, restart (leftovers removed first), retrain, finish_retrain, nothing, refuse, read
    why: str = ""  # a refusal's reason, or what `nothing` says
    advice: Command | None = None  # the command to run instead (a refusal's), None where only another folder will do


# what each action does, as the dry run says it
ACTIONS = {"search": "the search runs (a new study, or the interrupted one continued)",
           "restart": "what that run left is removed and the study starts afresh",
           "retrain": "its best configuration is retrained again", "finish_retrain": "its retrain is finished",
           "nothing": "nothing to do", "refuse": "this command is refused", "read": "read"}


def _refuse(why: str, advice: Command | None) -> Decision:
    return Decision("refuse", why, advice)


ANALYZE = Command("analyze")


def decide(state: str, cmd: Command, can_retrain: bool = True) -> Decision:
    """The table: what `cmd` does in a folder in `state`, for a space that retrains its best
    configuration or not. The state decides which verb may run; then the flags (--warm-start,
    --no-retrain) are checked against that verb."""
    again = "retrain its best configuration again with --retrain, " if can_retrain else ""
    if cmd.verb == "analyze":
        return Decision("read") if state in ("interrupted", "ended", "retrain_cut") else \
            _refuse(f"holds {STATES[state]}: nothing to read", None)
    if state == "foreign":
        return _refuse("holds files that are not a study's (no spec.yaml, or not written by study.run); "
                       "choose another name or --storage", None)
    if state in ("absent", "unstarted"):
        if cmd.verb != "start":
            return _refuse(f"holds {STATES[state]}; start the study", dataclasses.replace(cmd, verb="start"))
        return Decision("search" if state == "absent" else "restart")
    if state == "interrupted" and cmd.verb != "resume":
        return _refuse(f"holds {STATES[state]}; continue it", Command("resume", no_retrain=cmd.no_retrain))
    if cmd.verb == "start":  # ended, retrain_cut
        if state == "retrain_cut":
            return _refuse(f"holds {STATES[state]}; finish its retrain", Command("resume"))
        return _refuse(f"holds {STATES[state]}; read it, {again}or choose another name or --storage", ANALYZE)
    if cmd.verb == "retrain" and not can_retrain:  # ended, retrain_cut
        return _refuse(f"holds {STATES[state]}, but its space sets no retrain (retrain.seeds empty or "
                       "retrain.epochs 0); read it", ANALYZE)
    # the verb fits the state; now the flags
    if cmd.warm_start:
        return _refuse("--warm-start: a study is warm-started when it begins, and this one has; leave --warm-start "
                       "out", Command(cmd.verb, no_retrain=cmd.no_retrain and cmd.verb != "retrain"))
    if cmd.verb == "retrain" and cmd.no_retrain:
        return _refuse("--retrain and --no-retrain contradict each other; give one", Command("retrain"))
    if state == "interrupted":
        return Decision("search")
    if cmd.verb == "retrain":
        return Decision("retrain")
    if state == "retrain_cut" and not cmd.no_retrain and can_retrain:
        return Decision("finish_retrain")
    retrain = "Retrain its best configuration again with --retrain; read" if can_retrain else "Read"
    return Decision("nothing", f"holds {STATES[state]}: nothing to resume. {retrain} it with python -m study.analyze")


def command(args) -> Command:
    """The Command of study.run's parsed arguments."""
    verb = "resume" if args.resume else "retrain" if args.retrain else "start"
    return Command(verb, warm_start=bool(args.warm_start), no_retrain=args.no_retrain)


def command_line(cmd: Command, argv: list[str], d) -> str:
    """`cmd` as the user would type it: their own study.run arguments, with the flags that choose
    the verb (--resume, --retrain) and --warm-start, --no-retrain set as `cmd` says."""
    if cmd.verb == "analyze":
        return f"python -m study.analyze {shlex.quote(str(d))}"
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--resume", "--retrain", "--no-retrain", "--dry-run"):
            pass
        elif a == "--warm-start" and not cmd.warm_start:
            skip = True
        elif cmd.warm_start or not a.startswith("--warm-start="):
            out.append(a)
    flags = [f for f, on in (("--resume", cmd.verb == "resume"), ("--retrain", cmd.verb == "retrain"),
                             ("--no-retrain", cmd.no_retrain)) if on]
    return "python -m study.run " + " ".join(shlex.quote(a) for a in [*out, *flags])


def refusal(decision: Decision, argv: list[str], d) -> str:
    """A refusal as one line: the folder, why, and the command to run instead."""
    then = f": {command_line(decision.advice, argv, d)}" if decision.advice else ""
    return f"{d} {decision.why}{then}"


def continuation(state: str, argv: list[str], can_retrain: bool) -> Command:
    """The command that carries a folder in `state` on, after an interruption."""
    no_retrain = "--no-retrain" in argv
    if state in ("interrupted", "retrain_cut"):
        return Command("resume", no_retrain=no_retrain)
    if state == "ended":  # stopped between the export and the retrain's start
        return Command("retrain") if can_retrain and not no_retrain else ANALYZE
    warm = any(a == "--warm-start" or a.startswith("--warm-start=") for a in argv)
    return Command("start", warm_start=warm, no_retrain=no_retrain)


def next_step(d, argv: list[str] | None, can_retrain: bool = True) -> str:
    """What to run after an interruption, from what the folder holds now (argv None: not
    run from the command line, so no command to repeat)."""
    state = "absent" if d is None else read(d)
    cmd = continuation(state, argv or [], can_retrain)
    say = {"resume": "continue it with --resume", "retrain": "it ended before its retrain; retrain it with --retrain",
           "analyze": "it has ended; read it", "start": "the study had not started; run the same command again"}
    return say[cmd.verb] + (f" ({command_line(cmd, argv, d)})" if argv is not None else "")


class UsageError(Exception):
    """A flag that does not fit the study folder; study.run exits 2 with the message."""


class Locked(Exception):
    """Another process writes the study folder."""


def holder(d: Location) -> str | None:
    """Who holds the folder's lock ('host pid N: command'), or None; a lock left by a
    process of this host that no longer runs counts as none."""
    f = d / LOCK
    if not f.is_file():
        return None
    text = f.read_text().strip()
    host, _, rest = text.partition(" pid ")
    pid = rest.split(":")[0]
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
    return text or None


def take_lock(d: Location, command: str) -> str:
    """Take the folder's lock before anything is written, or raise Locked naming its holder.
    A stale lock (its process gone) is taken over with a line saying so."""
    mine = f"{socket.gethostname()} pid {os.getpid()}: {command}"
    f = d / LOCK
    if f.is_file():
        held = holder(d)
        if held is not None:
            raise Locked(f"{d} is being written by {held}; wait for it to end (python -m study.analyze {d} reads it "
                         f"meanwhile), or stop that process; if it is gone, delete {f}")
        print(f"{d}: taking over the lock of a process that no longer runs ({f.read_text().strip()})", flush=True)
        f.delete()
    d.fs.create_dir(d.path, recursive=True)
    if d.local is not None:  # O_EXCL: of two processes starting at once, one wins
        try:
            fd = os.open(d.local / LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise Locked(f"{d} is being written by {holder(d)}; wait for it to end, or stop that process") from None
        with os.fdopen(fd, "w") as out:
            out.write(mine + "\n")
    else:  # an object store has no exclusive create: written, then read back
        f.write_text(mine + "\n")
        if f.read_text().strip() != mine:
            raise Locked(f"{d} is being written by {holder(d)}; wait for it to end, or stop that process")
    return mine


def release_lock(d: Location, mine: str) -> None:
    """Remove the lock if it is still this process's."""
    f = d / LOCK
    try:
        if f.is_file() and f.read_text().strip() == mine:
            f.delete()
    except OSError as e:  # the folder went away (a test's tmp, a bucket): nothing to release
        print(f"warning: could not remove {f}: {e}", file=sys.stderr)
