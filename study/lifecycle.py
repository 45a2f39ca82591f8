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
# no restorable Ray state) is started afresh rather than refused, after `kept` has found nothing in them
# that a start afresh would lose. optuna.db's -journal (-wal, -shm): SQLite's, left by a kill while
# Optuna created the database; timing.yaml: its entry is written as a run starts.
LEFTOVERS = ("spec.yaml", "environment.yaml", "optuna.db", "optuna.db-journal", "optuna.db-wal", "optuna.db-shm",
             "ray", "estimate.yaml", "warm_start.yaml", "timing.yaml", "report")
# What study.analyze writes in report/: a report/ holding only these is one it wrote, which a restart may
# remove; anything else there is a person's own
REPORT_FILES = ("report.md", "*.png", "*.tmp")
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


def kept(d: Location) -> str | None:
    """Why the leftovers of an unstarted folder may not be removed (a start afresh would lose what no run of
    a study wrote before its first trial), or None: an optuna.db holding finished trials (copied in, or
    the database of a study whose Ray state is gone), a report/ holding files that study.analyze does not
    write. The reason ends with what to do instead."""
    import fnmatch

    again = "move it away and run the same command again, or choose another name or --storage"
    db = d / "optuna.db"
    if db.is_file():
        n = finished_trials(db)
        if n is None:
            return f"holds {db}, which is not an SQLite database that Optuna wrote: {again}"
        if n:
            them = "them" if n > 1 else "it"
            return (f"holds {db} with {n} finished trial{'s' if n > 1 else ''} but no Ray state to resume from "
                    f"(a start afresh would delete {them}; Optuna reads {them}: optuna-dashboard sqlite:///{db}): "
                    f"{again}")
    report = d / "report"
    if report.is_file():
        return f"holds {report}, a file where study.analyze writes a folder: {again}"
    if report.exists():
        files = report.fs.get_file_info(pafs.FileSelector(report.path, recursive=True))
        theirs = [i.path for i in files if i.type != pafs.FileType.File or Path(i.path).parent.as_posix() != report.path
                  or not any(fnmatch.fnmatch(Path(i.path).name, p) for p in REPORT_FILES)]
        if theirs:
            return f"holds {report} with files study.analyze does not write ({', '.join(sorted(theirs)[:3])}): {again}"
    return None


def finished_trials(db: Location) -> int | None:
    """How many trials of SQLite database `db` have finished (COMPLETE, PRUNED); None if it is not one.
    A kill while Optuna created it leaves its rollback journal (optuna.db-journal): opening it rolls back."""
    import sqlite3
    import tempfile
    from contextlib import closing

    with tempfile.TemporaryDirectory(prefix="csnn-db-") as tmp:
        path = db.local
        if path is None:  # behind a URI: the copy of the driver's database, read here
            path = Path(tmp) / "optuna.db"
            path.write_bytes(db.read_bytes())
        try:
            with closing(sqlite3.connect(path, timeout=5)) as c:
                if not c.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'trials'").fetchone():
                    return 0
                return c.execute("SELECT count(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED')").fetchone()[0]
        except sqlite3.Error:
            return None


def restorable(ray_dir: Location) -> bool:
    """Whether Ray Tune can continue the run recorded in `ray_dir` (the search's ray/, a retrain's
    folder): its Tuner state (tuner.pkl, not empty: a crash while Ray wrote it left 0 bytes) and a
    saved experiment state (before Ray's first save, a restore starts with no trials and misbehaves:
    a retrain's trials came back without their seed), and no searcher state left empty (a kill just after
    the experiment state was saved left search_gen_state-*.json with 0 bytes: Ray's restore then fails
    with EOFError and restarts the experiment from nothing, its earlier trials forgotten). Else that run
    never recorded a trial that Ray can continue, and it starts afresh."""
    info = {Path(i.path).name: i for i in ray_dir.fs.get_file_info(pafs.FileSelector(ray_dir.path,
                                                                                     allow_not_found=True))}
    tuner = info.get("tuner.pkl")
    return (tuner is not None and tuner.type == pafs.FileType.File and (tuner.size or 0) > 0
            and any(n.startswith("experiment_state") and n.endswith(".json") for n in info)
            and not empty_searcher_state(info))


def empty_searcher_state(info: dict) -> list[str]:
    """The searcher's saved states (Ray's search_gen_state-*.json, searcher-state-*.pkl; a retrain's grid,
    basic-variant-state-*.json: empty, its restore ran a trial with no config) that are empty."""
    return [n for n, i in info.items()
            if n.startswith(("search_gen_state", "searcher-state", "basic-variant-state")) and not (i.size or 0)]


def unwritable(d: Location) -> str | None:
    """Why the local study folder `d`, which exists, cannot be written (a read-only mount, no permission),
    or None (it can, it does not exist yet, or it is behind a URI)."""
    if d.local is None or not d.local.is_dir() or os.access(d.local, os.W_OK):
        return None
    return "a read-only file system" if os.statvfs(d.local).f_flag & os.ST_RDONLY else "not writable by you"


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
        elif a in ("--resume", "--retrain", "--no-retrain"):  # --dry-run stays: the advice of a dry run is one
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
    """Another process writes the study folder (or its lock is damaged: the message says how to remove it)."""


# The lock. Its file is made whole under a temporary name and linked into place (link() fails if the lock
# exists), so it never exists empty or half-written. Its holder keeps an flock() on it while it lives: the
# kernel lets go when the process ends, however it ends, so "is it held" is the kernel's answer, not a pid
# that another program may have by now (after a reboot) nor a copy of a lock whose process writes another
# folder (a folder copied while its study ran). A stale lock is taken over under its own flock, which one
# taker alone can hold: renamed aside, then the new lock linked in; so two takers never both win.
# Where flock() is not supported, the recorded pid and command line are compared with what runs now.
_HELD: dict[str, int] = {}  # lock path -> the open file whose flock this process holds


def _proc_cmdline(pid: int) -> str | None:
    """What process `pid` runs, as /proc shows it (arguments joined by spaces); None where there is no /proc."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


def _parse(text: str) -> dict:
    """A lock's lines: the first says who holds it ('host pid N: command'), then 'folder: ...', 'cmdline: ...'."""
    first, *rest = text.strip().splitlines() or [""]
    out = {"line": first}
    out["host"], _, after = first.partition(" pid ")
    out["pid"] = after.split(":")[0]
    for line in rest:
        k, _, v = line.partition(": ")
        out[k] = v
    return out


def _damaged(f, what: str) -> Locked:
    return Locked(f"{f}: a damaged lock ({what}; study.run writes a line naming its process). If no study.run, "
                  f"study.reproduce or study.analyze runs on this folder, remove it (rm -r {shlex.quote(str(f))}) "
                  "and run the command again")


def _read_lock(f) -> str:
    """The lock's text, or Locked saying it is damaged (empty, not text, a folder)."""
    try:
        if f.kind() == pafs.FileType.Directory:
            raise _damaged(f, "a folder, not a file")
        data = f.read_bytes()
    except IsADirectoryError:
        raise _damaged(f, "a folder, not a file") from None
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise _damaged(f, "not text") from None
    if not text.strip() or " pid " not in text.splitlines()[0]:
        raise _damaged(f, "empty" if not text.strip() else "not a holder's line")
    return text


def _alive(rec: dict, folder) -> bool:
    """Without flock(): whether the recorded process still runs this study here (same host only: another
    host's process cannot be asked, so it counts as alive)."""
    if rec.get("folder") not in (None, str(folder)):
        return False  # the lock of the folder this one was copied from
    if rec["host"] != socket.gethostname() or not rec["pid"].isdigit():
        return True
    try:
        os.kill(int(rec["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _proc_cmdline(int(rec["pid"]))
    return rec.get("cmdline") is None or now is None or now == rec["cmdline"]  # else: the pid is another program's


def _flock(fd: int, shared: bool = False) -> bool | None:
    """Try to lock the open file without waiting: True if got, False if another holds it, None where the
    file system has no flock()."""
    import errno
    import fcntl

    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def holder(d: Location) -> str | None:
    """Who holds the folder's lock ('host pid N: command'), or None (no lock, or a stale one: its process
    ended, or it is the lock of another folder this one was copied from). Raises Locked for a damaged lock."""
    f = d / LOCK
    if not f.exists():
        return None
    text = _read_lock(f)
    rec = _parse(text)
    if d.local is None:
        return rec["line"]
    try:
        fd = os.open(d.local / LOCK, os.O_RDONLY)
    except FileNotFoundError:  # let go meanwhile
        return None
    try:
        if str(d.local / LOCK) in _HELD:
            return rec["line"]  # this process holds it
        free = _flock(fd, shared=True)
    finally:
        os.close(fd)  # a shared flock, if got, goes with it
    if free is None:
        return rec["line"] if _alive(rec, d.local) else None
    return None if free else rec["line"]


def check_lock(d: Location) -> None:
    """What take_lock would refuse, without taking the lock (a --dry-run, which writes nothing, says what
    the command would do): Locked for a damaged lock or one that another process holds."""
    held = holder(d)
    if held is not None:
        raise Locked(_held_line(d, held))


def take_lock(d: Location, command: str) -> str:
    """Take the folder's lock before anything is written, or raise Locked naming its holder.
    A stale lock (its process gone) is taken over with a line saying so."""
    mine = f"{socket.gethostname()} pid {os.getpid()}: {command}"
    d.fs.create_dir(d.path, recursive=True)
    if d.local is None:  # an object store has no exclusive create: written, then read back
        f = d / LOCK
        held = holder(d)
        if held is not None:
            raise Locked(_held_line(d, held))
        f.write_text(mine + "\n")
        if f.read_text().strip() != mine:
            raise Locked(_held_line(d, holder(d)))
        return mine
    import uuid

    lock = d.local / LOCK
    text = f"{mine}\nfolder: {d.local}\ncmdline: {_proc_cmdline(os.getpid()) or ' '.join(sys.argv)}\n"
    tmp = d.local / f"{LOCK}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    try:
        os.write(fd, text.encode())
        flock = _flock(fd)  # ours from before it is the lock: no moment when it is the lock and free
        for _ in range(100):  # each turn: another process changed the lock meanwhile; look again
            try:
                os.link(tmp, lock)
                _HELD[str(lock)] = fd
                return mine
            except FileExistsError:
                _take_over(d, lock, flock)  # raises Locked if it is held
        raise Locked(_held_line(d, holder(d)))
    except BaseException:
        if _HELD.get(str(lock)) != fd:
            os.close(fd)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _take_over(d: Location, lock: Path, flock: bool | None) -> None:
    """The lock that exists: remove it if it is stale (then the caller tries again), else raise Locked naming
    its holder."""
    import time
    import uuid

    try:
        old = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return  # released meanwhile
    except IsADirectoryError:
        raise _damaged(d / LOCK, "a folder, not a file") from None
    try:
        got = None
        for _ in range(5 if flock is not None else 0):  # another's look (study.analyze's) lasts moments: wait
            got = _flock(old)
            if got is not False:
                break
            time.sleep(0.005)
        if os.fstat(old).st_ino != _ino(lock):
            return  # not the lock any more (released, or taken over by another): look again
        text = _read_lock(d / LOCK)
        rec = _parse(text)
        if got is False or (got is None and _alive(rec, d.local)):
            raise Locked(_held_line(d, rec["line"]))
        # Stale, and (with flock) ours alone to remove: no other taker holds its flock now.
        copied = rec.get("folder") not in (None, str(d.local))
        why = "of another folder" if copied else "of a process that no longer runs"
        print(f"{d}: taking over the lock {why} ({rec['line']})", flush=True)
        aside = lock.with_name(f"{LOCK}.{uuid.uuid4().hex[:8]}.stale.tmp")
        os.rename(lock, aside)
        if os.stat(aside).st_ino != os.fstat(old).st_ino:  # without flock two takers can cross: give it back
            os.link(aside, lock)
            os.unlink(aside)
            raise Locked(_held_line(d, holder(d)))
        os.unlink(aside)
    finally:
        os.close(old)


def _ino(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _held_line(d: Location, held: str | None) -> str:
    return (f"{d} is being written by {held}; wait for it to end (python -m study.analyze {d} reads it "
            f"meanwhile), or stop that process; if it is gone, delete {d / LOCK}")


def release_lock(d: Location, mine: str) -> None:
    """Remove the lock if it is still this process's."""
    f = d / LOCK
    fd = _HELD.pop(str(d.local / LOCK), None) if d.local is not None else None
    try:
        if f.is_file() and _parse(f.read_bytes().decode(errors="replace"))["line"] == mine:
            f.delete()  # before the flock goes: a taker that opened it meanwhile sees it is no longer the lock
    except OSError as e:  # the folder went away (a test's tmp, a bucket): nothing to release
        print(f"warning: could not remove {f}: {e}", file=sys.stderr)
    finally:
        if fd is not None:
            os.close(fd)
