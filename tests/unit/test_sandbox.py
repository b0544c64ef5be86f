"""Hostile programs: each must end as a failed sample with a reason, in time, leaving nothing behind."""

import json
import os
import socket
import time
from pathlib import Path

import psutil
import pytest

from qtrain import sandbox
from qtrain.sandbox import Limits, SandboxUnavailable, isolation_problems, run_many, run_program, sandbox_mode

MODE = sandbox_mode(unsafe=True)  # bwrap where it isolates, else the unsafe mode the other tests compare
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
        assert isolation_problems() == [], "bubblewrap is installed but its self-test fails"
        assert MODE == "bwrap", "bubblewrap is installed but not used"
    assert MODE in ("bwrap", "unshare", "plain")


def test_without_a_sandbox_nothing_runs_unless_the_risk_is_accepted(monkeypatch):
    """bwrap hidden: the self-test names what is missing, the safe mode refuses with the ways out, and only the
    explicit flag gets an (unisolated) mode."""
    import shutil

    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "bwrap" else real_which(name, *a, **k))
    monkeypatch.setattr(sandbox, "_MODE", {})
    assert isolation_problems() == ["bubblewrap (bwrap) is not installed"]
    with pytest.raises(SandboxUnavailable, match="Install bubblewrap.*--unsafe-no-sandbox"):
        sandbox_mode()
    assert sandbox_mode(unsafe=True) in ("unshare", "plain")


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


BWRAP_ONLY = pytest.mark.skipif(MODE != "bwrap", reason="needs bubblewrap")


@BWRAP_ONLY
def test_runs_unprivileged_without_capabilities():
    prog = ("import os\nstatus = open('/proc/self/status').read()\n"
            "print(os.getuid(), int(status.split('CapEff:')[1].split()[0], 16), "
            "int(status.split('CapBnd:')[1].split()[0], 16))\n") + GOOD
    r = run_program(prog, CHECKS, LIMITS)
    assert r.passed, r.reason
    uid, eff, _ = map(int, r.stdout.split())
    assert uid != 0 and eff == 0


@BWRAP_ONLY
def test_cannot_remount_the_system_writable():
    """As root, bwrap without --cap-drop let a program remount / read-write; here the mount call fails and the
    system stays read-only."""
    prog = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "rc = libc.mount(b'none', b'/usr', None, 32 | 4096, None)\n"  # MS_REMOUNT | MS_BIND
            "assert rc != 0, 'remounted'\nopen('/usr/qtrain-escaped', 'w')\n") + GOOD
    r = run_program(prog, CHECKS, LIMITS)
    assert not r.passed and ("Read-only" in r.reason or "Permission" in r.reason), r.reason
    assert not Path("/usr/qtrain-escaped").exists()


@BWRAP_ONLY
def test_home_root_and_the_checkout_are_not_visible(tmp_path):
    secret = Path.home() / ".cache" / "qtrain" / "test-secret"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text("token")
    here = Path(__file__).resolve()
    try:
        for path in (secret, here, Path("/root/.bashrc"), Path("/etc/shadow")):
            r = run_program(f"print(open({str(path)!r}).read())\n" + GOOD, CHECKS, LIMITS)
            assert not r.passed and r.status == "error", (path, r.reason)
            assert "token" not in r.stdout and "Hostile programs" not in r.stdout
    finally:
        secret.unlink()


@BWRAP_ONLY
def test_dev_shm_and_tmp_share_the_disk_budget():
    budget = Limits(timeout_s=10, cpu_s=10, disk_bytes=16 << 20, file_bytes=64 << 20)
    for path in ("/dev/shm/fill", "/tmp/fill"):
        prog = f"f = open({path!r}, 'wb')\nfor _ in range(32):\n    f.write(b'0' * 2**20)\n    f.flush()\n" + GOOD
        r = run_program(prog, CHECKS, budget)
        assert not r.passed and "No space" in r.reason, (path, r.reason)


@BWRAP_ONLY
def test_process_limit_holds_even_as_root():
    """RLIMIT_NPROC does not bind root; inside the sandbox the program is not root, so it does."""
    prog = ("import os, time\nn = 0\nfor _ in range(100):\n    try:\n        pid = os.fork()\n    except OSError:\n"
            "        break\n    if pid == 0:\n        time.sleep(5)\n        os._exit(0)\n    n += 1\nprint(n)\n") + GOOD
    r = run_program(prog, CHECKS, Limits(timeout_s=8, cpu_s=8, processes=16))
    assert r.stdout.split(), r.reason
    assert int(r.stdout.split()[0]) < 16, r.stdout


FORGERIES = {
    "an __eq__ that always answers True": (
        "class Yes:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
        "def add(a, b):\n    return Yes()\n"),
    "a subclass of int that equals everything": (
        "class Int(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
        "def add(a, b):\n    return Int(0)\n"),
    "fake entries through the harness's globals": (
        "import sys\nm = sys.modules['__main__']\nfor _ in range(5):\n    m.emit({'ok': True})\n"
        "def add(a, b):\n    return 0\n"),
    "the result channel and the nonce": (
        "import os, sys\nm = sys.modules['__main__']\n"
        "for fd in range(3, 64):\n    try:\n        os.write(fd, ('{\"nonce\": \"%s\", \"entries\": []}' % m.nonce).encode())\n"
        "    except OSError:\n        pass\n"
        "def add(a, b):\n    return 0\n"),
    "the harness's memory": (
        "import os\nopen(f'/proc/{os.getppid()}/mem', 'rb')\ndef add(a, b):\n    return a + b\n"),
    "replacing the comparison's builtins": (
        "import builtins\nbuiltins.set = lambda *a: {4, 5}\ndef add(a, b):\n    return 0\n"),
}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_a_pass_cannot_be_forged(name):
    r = run_program(FORGERIES[name], CHECKS + ["assert set([add(2, 2)]) == set((4,))"], LIMITS)
    assert not r.passed, f"{name}: {r.reason}"
    assert r.statement_checks == 0


def test_a_crafted_report_fails_its_own_sample_and_never_the_run():
    from qtrain.sandbox import _verdict, plan_check

    plans = [plan_check(c) for c in CHECKS]
    common = dict(seconds=0.1, returncode=0, stdout="", stderr="", checks_total=2, statement_checks=0)
    crafted = [
        {"entries": "not a list"},
        {"entries": ['{"stage": "start"}', "[1, 2]", "3"]},
        {"entries": ['{"stage": "start"}', '{"value": ["int", "3"]}', '{"value": ["int", "0"]}'],
         "leftover_processes": "many"},
        {"entries": ['{"stage": "start"}', '{"value": ["int", "3"]}', '{"value": ["weird", 0]}']},
        {"entries": ['{"stage": "start"}', '{"value": ["int", "3"]}', '{"ok": true}']},  # ok is for statements
        {"entries": ['{"stage": "start"}', '{"value": ["int", "9999"]}', '{"value": ["dict", [[["list", []], 1]]]}']},
        {"entries": ['{"stage": "program", "error": 5}']},
    ]
    for report in crafted:
        r = _verdict(report, plans, common)
        assert not r.passed, report
    good = {"entries": ['{"stage": "start"}', '{"value": ["int", "3"]}', '{"value": ["int", "0"]}'],
            "leftover_processes": 0}
    assert _verdict(good, plans, common).passed


def test_checks_are_scored_by_value_where_their_shape_allows():
    from qtrain.sandbox import plan_check

    value = ["assert f(1) == 3", "assert 3 == f(1)", "assert f(1) != [1, 2]", "assert f(2) is None",
             "assert set(f(1)) == set((4, 5))", "assert f(1) == (3 + 5, 3.0 / 2)", "assert is_odd(3)",
             "assert not is_odd(2)"]
    statement = ["assert abs(f(1) - 0.5) < 1e-6", "assert math.isclose(f(1), 2.0)", "assert all(f(1))",
                 "for x in range(3):\n    assert f(x) == x", "assert f(1) == g(1)", "assert f(1) is 5",
                 "assert f(1) == 'a' * 10**9"]
    assert [plan_check(c).kind for c in value] == ["value"] * len(value)
    assert [plan_check(c).kind for c in statement] == ["statement"] * len(statement)
    p = plan_check("assert f(1) == (3 + 5, 3.0 / 2)")
    assert p.expr == "f(1)" and p.expected == (8, 1.5)
    r = run_program("def f(x):\n    return x * 2.0\n", ["assert abs(f(1) - 2.0) < 1e-6", "assert f(1) == 2"], LIMITS)
    assert r.passed and r.statement_checks == 1


def test_stdout_reaches_the_result():
    r = run_program("import sys\nsys.stdout.write('no newline, still buffered')\n" + GOOD, CHECKS, LIMITS)
    assert r.passed and "no newline, still buffered" in r.stdout


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


def test_an_interpreter_under_tmp_or_a_private_home_stays_visible(monkeypatch):
    import sys

    monkeypatch.setattr(sys, "prefix", "/tmp/some-venv")
    monkeypatch.setattr(sys, "base_prefix", "/root/.pyenv/versions/3.11.7")
    binds = sandbox._interpreter_binds()
    assert binds[binds.index("/tmp/some-venv") - 1] == "--ro-bind"
    # /root is 0700 on the host; the sandbox's own /root must be 0755 so that nobody can reach the interpreter
    i = binds.index("/root")
    assert binds[i - 3:i] == ["--perms", "0755", "--dir"]
    assert "/root/.pyenv/versions/3.11.7" in binds


REPO = str(Path(__file__).resolve().parents[2])


def _python_for_nobody() -> str | None:
    """An interpreter that uid 65534 can run with this checkout's qtrain on its path: ours, or the system's when
    ours sits under a 0700 /root; None when not root or neither works."""
    import subprocess
    import sys

    if os.getuid() != 0:
        return None
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            ok = subprocess.run([python, "-c", "import qtrain.sandbox"], user=65534, group=65534, extra_groups=[],
                                capture_output=True, timeout=60, cwd="/",
                                env={"PATH": "/usr/bin:/bin", "PYTHONPATH": REPO}).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return python
    return None


NOBODY_PYTHON = _python_for_nobody()


@pytest.mark.skipif(NOBODY_PYTHON is None, reason="needs root, and an interpreter and checkout that nobody can read")
def test_the_sandbox_holds_for_an_unprivileged_user_too():
    """The same containment when the evaluator itself is a normal user (bwrap then uses a user namespace)."""
    import subprocess

    script = ("import json, os\nfrom qtrain.sandbox import sandbox_mode, run_program\n"
              "mode = sandbox_mode(unsafe=True)\n"
              "probe = 'import os\\nprint(os.getuid(), open(\"/proc/self/status\").read().split(\"CapEff:\")[1].split()[0])\\n'\n"
              "good = run_program(probe + 'def add(a, b):\\n    return a + b\\n', ['assert add(1, 2) == 3'], mode=mode)\n"
              "bad = run_program('open(\"/etc/passwd-escaped\", \"w\")\\n', ['pass'], mode=mode)\n"
              "print(json.dumps([mode, good.passed, good.stdout, bad.passed, bad.reason]))\n")
    out = subprocess.run([NOBODY_PYTHON, "-c", script], user=65534, group=65534, extra_groups=[], capture_output=True,
                         text=True, timeout=120, cwd="/",
                         env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr[-500:]
    mode, good, stdout, bad, reason = json.loads(out.stdout.strip().splitlines()[-1])
    assert good and not bad, (stdout, reason)
    if mode == "bwrap":
        uid, caps = stdout.split()
        assert int(uid) == 65534 and int(caps, 16) == 0
        assert "Read-only" in reason
    assert not Path("/etc/passwd-escaped").exists()
