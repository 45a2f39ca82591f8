"""The docs cannot drift from the code: every command in a ```bash block of README.md,
results/README.md and docs/*.md either runs here (RUN), in a workspace whose results/quick is
a small real study, or is listed in NOT_RUN with the reason. A command in neither list fails,
and so does a list entry that no doc holds any more. The options of the commands not run are
looked up in their module's --help. docs/running.md's state table is checked against
study.lifecycle, and every relative link against the file and heading it names."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, env
from study import lifecycle

DOCS = [ROOT / "README.md", ROOT / "results" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# What each command that runs must show: a text in its output, or "file:PATH", a file it wrote.
# "tiny:" first: run with CSNN_DATA naming the tiny real data set that results/quick was trained on;
# "new:" first: run where no study has run yet (no results/: a study.run of quick.yaml would find
# results/quick ended and refuse, as docs/running.md's table says).
RUN = {
    "ls results/quick": "spec.yaml",
    "python -m study.run search_spaces/quick.yaml --dry-run": "new:estimate: wall",
    "python -m study.run --help": "--warm-start",
    "sed 's/^name: .*/name: quick_efficiency_nostop/; s/^scheduler: .*/scheduler: {type: none, silent_rate: 0}/' "
    "search_spaces/quick_efficiency_asha.yaml > nostop.yaml": "file:nostop.yaml",
    "python -m study.analyze results/quick": "file:results/quick/report/report.md",
    "python -m study.reproduce results/quick --epochs 1": "tiny:file:results/quick/reproduce",
    "python -m csnn.gpucheck --help": "--quick",
    "python -m csnn.train -device cpu -T 2 -channels 4 -epochs 1 -train-size 500 -test-size 100":
        "tiny:file:logs/T2_b128_sgd_lr0.1_c4/checkpoint_latest.pth",
}

GPU = "needs a CUDA GPU (python -m csnn.gpucheck runs the GPU path where there is one)"
CLUSTER = "needs a Ray cluster; tests/test_cluster.py runs these lines on a head, a worker and a driver"
MINUTES = "minutes of training or more; its options are checked against --help below"
INSTALL = "installs or downloads packages"
CI = "one of the front page's two commands: CI (.ci/run) runs them on a clean clone"
SERVER = "starts a server that runs until stopped"
NOT_RUN = {
    "apt-get update && apt-get install -y make && make quick": CI,
    "make test": CI,
    "make newest": INSTALL + " (the last step of .ci/run)",
    ". .venv/bin/activate": "changes the user's shell only; this test already runs in that environment",
    "python -m study.run search_spaces/fmnist.yaml": MINUTES + " (hours, on GPUs)",
    "python -m study.run search_spaces/fmnist.yaml --dry-run":
        "calibrates this CPU at the GPU study's sizes: 30 s on the loaded 2-core machine (2026-12-05); the "
        "quick.yaml dry run, which runs here, takes the same path",
    "python -m study.analyze results/fmnist": "reads the GPU study above, which is not run; " + MINUTES,
    "tensorboard --logdir results/quick/ray": SERVER,
    "pip install -e '.[dashboard]'": INSTALL,
    "optuna-dashboard sqlite:///results/quick/optuna.db": SERVER + "; needs pip install -e '.[dashboard]'",
    "python -m csnn.gpucheck --quick --out gpucheck-quick.json": GPU,
    "python -m csnn.gpucheck --data-dir /usr/share/datasets/fashion-mnist --out gpucheck.json": GPU,
    "python3 -m csnn.gpucheck --data-dir DIR_WITH_THE_FOUR_IDX_FILES": GPU,
    "python -m study.run search_spaces/fmnist.yaml --address HEAD_IP:6379 --storage s3://bucket/results": CLUSTER,
    "python -m study.run search_spaces/fmnist.yaml --address HEAD_IP:6379 --storage /shared/results": CLUSTER,
    "ray get-auth-token --generate > /dev/null": CLUSTER,
    "export RAY_AUTH_MODE=token": CLUSTER,
    "ray start --head --port=6379": CLUSTER,
    "mkdir -p ~/.ray && scp HEAD_IP:.ray/auth_token ~/.ray/auth_token": CLUSTER,
    "ray start --address=HEAD_IP:6379": CLUSTER,
    "pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 "
    "-d wheels spikingjelly==2.0.0 loguru": INSTALL,
    "pip install --no-index --no-deps --target /tmp/site wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD": INSTALL,
    "python -m study.run search_spaces/quick.yaml --storage results/next --warm-start results/quick": MINUTES,
    "python -m study.run search_spaces/quick_efficiency_asha.yaml": MINUTES,
    "python -m study.analyze results/quick_efficiency_asha": "reads the study above, which is not run; " + MINUTES,
    "python -m study.run nostop.yaml --no-retrain": MINUTES,
    "python -m study.analyze results/quick_efficiency_asha --against results/quick_efficiency_nostop":
        "reads the two studies above, which are not run; " + MINUTES,
    "python -m csnn.train -T 4 -device cpu -b 128 -epochs 1 -opt sgd -lr 0.1 -channels 16 "
    "-data-dir /usr/share/datasets/fashion-mnist": MINUTES + " (a minute on 2 cores)",
    "python -m csnn.train -device cpu -b 4 -resume logs/T4_b128_sgd_lr0.1_c16/checkpoint_latest.pth -save-es es":
        "reads the checkpoint of the one-epoch run above, which is not run; its options are checked against --help",
    "python -m csnn.bench --device cpu -T 4 --channels 16 --batch-size 128": MINUTES + " (a benchmark)",
    "python -m csnn.bench --device cuda --channels 128 --backend cupy": GPU,
}


def _strip_comment(line: str) -> str:
    """The line without a shell comment (a # at its start or after a space, outside quotes)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def blocks(path: Path):
    """(language, lines, line number) of each fenced block of a Markdown file."""
    lang, lines, start = None, [], 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = re.match(r"^```(\S*)\s*$", line)
        if m and lang is None:
            lang, lines, start = m.group(1), [], n
        elif line.startswith("```") and lang is not None:
            yield lang, lines, start
            lang = None
        elif lang is not None:
            lines.append(line)


def commands(lines) -> list[str]:
    """The commands of a bash block: comments dropped, continued lines joined."""
    out, held = [], ""
    for line in lines:
        s = _strip_comment(line).strip()
        if s.endswith("\\"):
            held = f"{held} {s[:-1].strip()}".strip()
            continue
        s = f"{held} {s}".strip()
        held = ""
        if s:
            out.append(s)
    return out


def doc_commands() -> dict[str, str]:
    """Every command of the docs' bash blocks -> where it first appears (file:line)."""
    found = {}
    for path in DOCS:
        for lang, lines, n in blocks(path):
            if lang == "bash":
                for c in commands(lines):
                    found.setdefault(c, f"{path.relative_to(ROOT)}:{n}")
    return found


def test_every_doc_command_is_run_or_listed():
    found = doc_commands()
    assert not set(RUN) & set(NOT_RUN), set(RUN) & set(NOT_RUN)
    unlisted = {c: where for c, where in found.items() if c not in RUN and c not in NOT_RUN}
    assert not unlisted, ("commands in the docs that this test neither runs nor lists with a reason "
                          f"(add each to RUN or NOT_RUN): {unlisted}")
    stale = set(RUN) | set(NOT_RUN)
    stale -= set(found)
    assert not stale, f"listed here but in no doc any more: {stale}"
    # a command in a block without a language would escape the lists: mark it bash (or text)
    for path in DOCS:
        for lang, lines, n in blocks(path):
            if not lang:
                cmd = [s for s in lines if re.match(r"\s*(python3?|make|pip|ray|sed|tensorboard) ", s)]
                assert not cmd, f"{path.relative_to(ROOT)}:{n}: a block without a language holds commands {cmd}"


# Runs `python -m MODULE ARGS` jobs one after another in one interpreter, as `python -m` would
# (runpy, sys.argv, the job's folder and environment): the imports are paid once, not per command.
DRIVER = r"""
import contextlib, io, json, os, runpy, signal, sys, time, traceback
jobs, result, out = json.load(open(sys.argv[1])), sys.argv[2], []
def alarm(*_):
    raise TimeoutError("time limit")
signal.signal(signal.SIGALRM, alarm)
for job in jobs:
    saved, buf, t = dict(os.environ), io.StringIO(), time.time()
    os.environ.update(job["env"])
    os.chdir(job["cwd"])
    sys.argv = [job["module"], *job["args"]]
    code = 0
    signal.alarm(job["timeout"])
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        code, _ = -1, buf.write(traceback.format_exc())
    finally:
        signal.alarm(0)
        os.environ.clear()
        os.environ.update(saved)
    out.append({"code": code, "output": buf.getvalue(), "seconds": round(time.time() - t, 1)})
json.dump(out, open(result, "w"))
"""


def _python_module(cmd: str):
    """(module, arguments) of a `python -m MODULE ...` command, else None."""
    words = shlex.split(cmd)
    if len(words) >= 3 and words[0] in ("python", "python3") and words[1] == "-m" and \
            not any(w in ("&&", "|", ";", ">") for w in words):
        return words[2], words[3:]
    return None


def _run_python(jobs, tmp_path, timeout_s):
    spec, result = tmp_path / "jobs.json", tmp_path / "results.json"
    spec.write_text(json.dumps(jobs))
    p = subprocess.run([sys.executable, "-c", DRIVER, str(spec), str(result)], env=env(), capture_output=True,
                       text=True, timeout=timeout_s)
    assert p.returncode == 0 and result.exists(), p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(result.read_text())


def test_doc_commands_run(tiny_study, tiny_data_dir, tmp_path):
    """Each command of RUN, in a workspace holding search_spaces/ and, as results/quick, a copy
    of the tiny real study: exit 0 and what RUN says it shows."""
    ws, new = tmp_path / "ws", tmp_path / "new"
    for w in (ws, new):
        shutil.copytree(ROOT / "search_spaces", w / "search_spaces")
    shutil.copytree(tiny_study[0], ws / "results" / "quick")
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # `python` is this environment's
    found = doc_commands()
    order = [c for c in found if c in RUN]  # in the docs' order: a later command may read what an earlier wrote
    jobs, shell, failures = {}, {}, []
    for c in order:
        extra = {"CSNN_DATA": str(tiny_data_dir)} if RUN[c].startswith("tiny:") else {}
        cwd = new if RUN[c].startswith("new:") else ws
        mod = _python_module(c)
        if mod:
            jobs[c] = {"module": mod[0], "args": mod[1], "cwd": str(cwd), "env": extra, "timeout": 120}
        else:
            p = subprocess.run(["bash", "-c", c], cwd=cwd, env={**env(), "PATH": path, **extra}, capture_output=True,
                               text=True, timeout=60)
            shell[c] = {"code": p.returncode, "output": p.stdout + p.stderr}
    ran = dict(zip(jobs, _run_python(list(jobs.values()), tmp_path, timeout_s=600)))
    ran.update(shell)
    for c in order:
        print(f"{ran[c].get('seconds', '-'):>6} s  {c}")  # where the time goes (pytest -s)
        r, want = ran[c], RUN[c].removeprefix("tiny:").removeprefix("new:")
        cwd = new if RUN[c].startswith("new:") else ws
        ok = r["code"] == 0 and ((cwd / want[5:]).exists() if want.startswith("file:") else want in r["output"])
        if not ok:
            failures.append(f"{found[c]}: {c}\n  exit {r['code']}, wanted {want!r}; output:\n{r['output'][-1500:]}")
    assert not failures, "\n".join(failures)


def test_options_of_commands_not_run_exist(tmp_path):
    """The commands not run still name options their module has: each -flag of a
    `python -m MODULE ...` command of NOT_RUN appears in that module's --help."""
    wanted = {}
    for c in NOT_RUN:
        mod = _python_module(c)
        if mod:
            flags = [a.split("=")[0] for a in mod[1] if re.match(r"^--?[A-Za-z]", a)]
            wanted.setdefault(mod[0], set()).update(flags)
    assert {"study.run", "study.analyze", "csnn.train", "csnn.gpucheck", "csnn.bench"} <= set(wanted), wanted
    mods = sorted(wanted)
    helps = _run_python([{"module": m, "args": ["--help"], "cwd": str(ROOT), "env": {}, "timeout": 120}
                         for m in mods], tmp_path, timeout_s=300)
    missing = []
    for m, h in zip(mods, helps):
        assert h["code"] == 0, f"python -m {m} --help: {h['output'][-2000:]}"
        missing += [f"python -m {m} {f}" for f in sorted(wanted[m])
                    if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", h["output"])]
    assert not missing, f"options in the docs that --help does not list: {missing}"


def _cell(d: lifecycle.Decision) -> str:
    """A decision as docs/running.md's table writes it."""
    if d.action != "refuse":
        return d.action
    advice = {"start": "`study.run SPEC`", "resume": "`--resume`", "retrain": "`--retrain`",
              "analyze": "`study.analyze`"}
    return "refused" + (f": run {advice[d.advice.verb]}" if d.advice else "")


def test_running_doc_state_table_is_lifecycles():
    """The table of what each command does in each folder state is study.lifecycle's, row by row."""
    text = (ROOT / "docs" / "running.md").read_text()
    head = "| state | the folder holds | `study.run SPEC` | `--resume` | `--retrain` | `study.analyze DIR` |"
    assert head in text
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| `")]
    want = [[f"`{s}`", what, *(_cell(lifecycle.decide(s, lifecycle.Command(v)))
                                for v in ("start", "resume", "retrain", "analyze"))]
            for s, what in lifecycle.STATES.items()]
    assert rows == want


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_name_files_and_headings_that_exist():
    bad = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                bad.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md":
                heads = [_slug(m) for m in re.findall(r"^#+ (.*)$", dest.read_text(), re.M)]
                if anchor not in heads:
                    bad.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not bad, bad
