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


@pytest.mark.parametrize("command", ["study.analyze", "study.reproduce", "csnn.train", "csnn.bench"])
def test_ctrl_c_is_one_line_and_130(command, tiny_study, tiny_data_dir, tmp_path):
    d = shutil.copytree(tiny_study[0], tmp_path / "e2e")
    data = str(tiny_data_dir)
    argv = {"study.analyze": [command, str(d)], "study.reproduce": [command, str(d), "--data-dir", data],
            "csnn.train": [command, "-device", "cpu", "-T", "2", "-channels", "4", "-epochs", "3", "-data-dir", data,
                           "-out-dir", str(tmp_path / "logs")],
            "csnn.bench": [command, "--device", "cpu", "-T", "2", "--channels", "8", "--train-images", "512",
                           "--eval-images", "128", "--data-dir", data]}[command]
    # while importing (torch, matplotlib: seconds), then while working (reading, training, drawing)
    for after_s in (0.3, 4.0):
        p = interrupted(argv, after_s)
        if p.returncode == 0:  # it finished first: only a later moment could have been missed
            assert after_s > 0.3, p.stderr
            continue
        assert p.returncode == 130 and "Traceback" not in p.stderr, (after_s, p.stderr[-3000:])
        lines = [line for line in p.stderr.splitlines() if "interrupted" in line]
        assert len(lines) == 1 and (lines[0].startswith(f"{command}: interrupted") or command == "csnn.train"
                                    and lines[0].startswith("interrupted ")), p.stderr[-3000:]


PROBE = """
import os, signal, time
from csnn.argtypes import interruptible, leave

def main():  # the Ctrl-C lands in code run by a string exec, as in torch's compiled guards and fx code
    exec("os.kill(os.getpid(), signal.SIGINT); time.sleep(30)")
    return 0

leave(interruptible(main, "probe", "nothing written"))
"""
COMMANDS = ("csnn/bench.py", "csnn/gpucheck.py", "csnn/train/__main__.py", "study/analyze.py", "study/reproduce.py",
            "study/run.py")


def test_ctrl_c_caught_in_a_string_exec_still_exits_130(tmp_path):
    """CPython marks a KeyboardInterrupt out of a string exec as unhandled even when it is caught, and
    under python -m then kills itself with SIGINT at exit: csnn.bench printed its line, then rc -2."""
    (tmp_path / "probe.py").write_text(PROBE)
    p = subprocess.run([sys.executable, "-m", "probe"], env={**env(), "PYTHONPATH": f"{tmp_path}:{ROOT}"},
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 130 and p.stderr.strip() == "probe: interrupted; nothing written", (p.returncode, p.stderr)
    for name in COMMANDS:  # and every command ends through leave()
        main_block = (ROOT / name).read_text().rsplit('if __name__ == "__main__":', 1)[-1]
        assert "leave(" in main_block, f"{name} exits otherwise than through argtypes.leave"


def test_an_unreachable_storage_answers_in_time_and_ctrl_c_reaches_it(tmp_path):
    """gs:// with no network: pyarrow retried for minutes, deaf to Ctrl-C (140 s seen)."""
    import yaml

    from conftest import tiny_spec

    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump(tiny_spec("s")))
    argv = [sys.executable, "-m", "study.run", str(space), "--storage", "gs://missing-bucket/x", "--dry-run"]
    t0 = time.time()
    p = subprocess.run(argv, env={**env(), "CSNN_STORAGE_ANSWER_S": "3"}, cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "gs://missing-bucket/x: no answer in 3 s" in p.stderr, p.stderr[-2000:]
    assert time.time() - t0 < 60
    p = subprocess.Popen(argv, env={**env(), "CSNN_STORAGE_ANSWER_S": "600"}, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    time.sleep(6)  # past the imports, waiting for the storage
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err and err.count("interrupted") == 1, err[-2000:]
