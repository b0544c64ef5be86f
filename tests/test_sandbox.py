"""Hostile programs: each must end as a failed sample with a reason, in time, leaving nothing behind."""

import os
import socket
import time
from pathlib import Path

import psutil
import pytest

from qtrain.sandbox import Limits, detect_mode, run_many, run_program

MODE = detect_mode()
LIMITS = Limits(timeout_s=4.0, cpu_s=4, memory_bytes=1 << 30, file_bytes=8 << 20, disk_bytes=32 << 20)
GOOD = "def add(a, b):\n    return a + b\n"
CHECKS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]


def _leftovers() -> list:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any("harness.py" in part for part in (p.info["cmdline"] or [])):
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.fixture(autouse=True)
def machine_unchanged(tmp_path):
    before_dirs = {p.name for p in Path("/tmp").glob("qtrain-sbx-*")}
    yield
    deadline = time.time() + 5
    while _leftovers() and time.time() < deadline:
        time.sleep(0.1)
    assert not _leftovers(), "a sandboxed process outlived its sample"
    assert {p.name for p in Path("/tmp").glob("qtrain-sbx-*")} <= before_dirs, "a sandbox directory was left behind"


def test_mode_is_the_strongest_available():
    import shutil

    if shutil.which("bwrap"):
        assert MODE == "bwrap", "bubblewrap is installed but not used"
    assert MODE in ("bwrap", "unshare", "plain")


def test_a_correct_program_passes_and_a_wrong_one_names_the_assertion():
    ok = run_program(GOOD, CHECKS, LIMITS)
    assert ok.passed and ok.checks_passed == 2
    bad = run_program("def add(a, b):\n    return a - b\n", CHECKS + ["assert add(0, 0) == 0"], LIMITS)
    assert not bad.passed and bad.status == "failed"
    assert bad.check_oks == [False, False, True] and "AssertionError" in bad.check_errors[0]


def test_no_checks_is_not_a_pass():
    assert not run_program(GOOD, [], LIMITS).passed


HOSTILE = {
    "loop forever": ("while True:\n    pass\n" + GOOD, "timed out|SIGKILL|SIGXCPU"),
    "sleep past the timeout": ("import time\ntime.sleep(60)\n" + GOOD, "timed out"),
    "allocate 50 GB": ("x = bytearray(50 * 2**30)\n" + GOOD, "MemoryError"),
    "write 1 GB": ("f = open('big.bin', 'wb')\nfor _ in range(1024):\n    f.write(b'0' * 2**20)\n" + GOOD,
                   "File too large|No space|SIGXFSZ"),
    "print 100 MB": ("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 2**20)\nsys.stdout.flush()\n" + GOOD,
                     "File too large|SIGXFSZ|before reporting"),
    "os._exit before the checks": ("import os\nos._exit(0)\n" + GOOD, "before reporting"),
    "SystemExit(0) before the checks": ("raise SystemExit(0)\n" + GOOD, "SystemExit"),
    "child that outlives its parent": ("import subprocess\nsubprocess.Popen(['sleep', '60'], start_new_session=True)\n"
                                       + GOOD, "left 1 process|timed out"),
    "bounded fork storm": ("import os, time\nfor _ in range(200):\n    if os.fork() == 0:\n        time.sleep(30)\n"
                           "        os._exit(0)\n" + GOOD, "left 200 process|timed out|BlockingIOError|Resource"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_fails_in_time_with_a_reason(name):
    program, reason = HOSTILE[name]
    start = time.perf_counter()
    r = run_program(program, CHECKS, LIMITS)
    took = time.perf_counter() - start
    assert not r.passed, f"{name} passed"
    import re

    assert re.search(reason, r.reason), f"{name}: {r.status}: {r.reason}"
    assert took < LIMITS.timeout_s + 6
    assert len(r.stdout) <= LIMITS.output_bytes + 100


def test_os_exit_inside_a_check_is_not_a_pass():
    r = run_program(GOOD, ["import os\nos._exit(0)", *CHECKS], LIMITS)
    assert not r.passed and r.status == "no_result"


@pytest.mark.skipif(MODE != "bwrap", reason="filesystem isolation needs bubblewrap")
def test_cannot_write_outside_or_delete_files(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    home_file = Path.home() / ".qtrain-sandbox-probe"
    for prog in (f"open({str(home_file)!r}, 'w').write('x')\n",
                 f"import os\nos.remove({str(victim)!r})\n",
                 "import shutil\nshutil.rmtree('/usr/share/doc')\n"):
        r = run_program(prog + GOOD, CHECKS, LIMITS)
        assert not r.passed and r.status == "error", r.reason
    assert victim.read_text() == "keep me" and not home_file.exists()
    assert Path("/usr/share/doc").exists()


@pytest.mark.skipif(MODE == "plain", reason="no network namespace available")
def test_no_network_to_loopback_or_outside(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        for target in (("127.0.0.1", port), ("1.1.1.1", 80)):
            prog = f"import socket\nsocket.create_connection({target!r}, timeout=2)\n" + GOOD
            r = run_program(prog, CHECKS, LIMITS)
            assert not r.passed and ("ConnectionRefused" in r.reason or "unreachable" in r.reason), r.reason
    finally:
        server.close()


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("QTRAIN_TEST_SECRET", "hunter2")
    r = run_program("import os\nassert 'QTRAIN_TEST_SECRET' not in os.environ, 'leak'\n" + GOOD, CHECKS, LIMITS)
    assert r.passed, r.reason
    r = run_program("import os\nprint(os.environ.get('QTRAIN_TEST_SECRET'))\n" + GOOD, CHECKS, LIMITS)
    assert "hunter2" not in r.stdout


@pytest.mark.skipif(MODE == "plain", reason="needs a PID namespace")
def test_cannot_signal_the_evaluator():
    r = run_program(f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)\n" + GOOD, CHECKS, LIMITS)
    assert not r.passed and "ProcessLookupError" in r.reason


def test_stdin_is_closed():
    r = run_program("import sys\nassert sys.stdin.read() == ''\n" + GOOD, CHECKS, LIMITS)
    assert r.passed, r.reason


def test_parallel_workers_are_bounded_and_results_keep_order():
    jobs = [(f"def add(a, b):\n    return a + b + {i % 2}\n", "", CHECKS) for i in range(6)]
    results = run_many(jobs, LIMITS, workers=2)
    assert [r.passed for r in results] == [True, False] * 3


@pytest.mark.skipif(MODE != "bwrap" or os.getuid() != 0, reason="compares the fallback mode, which needs root")
def test_unshare_fallback_still_blocks_the_network_and_kills_on_timeout():
    r = run_program("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\n" + GOOD, CHECKS, LIMITS,
                    mode="unshare")
    assert not r.passed and "unreachable" in r.reason
    r = run_program("while True:\n    pass\n", CHECKS, Limits(timeout_s=2), mode="unshare")
    assert r.status == "timeout"


def test_an_interpreter_under_tmp_stays_visible(monkeypatch):
    import sys

    from qtrain import sandbox

    monkeypatch.setattr(sys, "prefix", "/tmp/some-venv")
    binds = sandbox._interpreter_binds()
    assert binds[binds.index("/tmp/some-venv") - 1] == "--ro-bind"
