"""Ctrl-C in every command: one line and exit 130, never a traceback, at any moment (while the
command imports its libraries, and while it works)."""
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, env


def interrupted(argv: list, after_s: float) -> subprocess.CompletedProcess:
    p = subprocess.Popen([sys.executable, "-m", *argv], env=env(), cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    time.sleep(after_s)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


@pytest.mark.parametrize("command", ["study.analyze", "study.reproduce"])
def test_ctrl_c_is_one_line_and_130(command, tiny_study, tiny_data_dir, tmp_path):
    d = shutil.copytree(tiny_study[0], tmp_path / "e2e")
    argv = [command, str(d)] + (["--data-dir", str(tiny_data_dir)] if command == "study.reproduce" else [])
    # while importing (torch, matplotlib: seconds), then while working (reading, training, drawing)
    for after_s in (0.3, 4.0):
        p = interrupted(argv, after_s)
        if p.returncode == 0:  # it finished first: only a later moment could have been missed
            assert after_s > 0.3, p.stderr
            continue
        assert p.returncode == 130 and "Traceback" not in p.stderr, (after_s, p.stderr[-3000:])
        lines = [line for line in p.stderr.splitlines() if "interrupted" in line]
        assert len(lines) == 1 and lines[0].startswith(f"{command}: interrupted"), p.stderr[-3000:]
