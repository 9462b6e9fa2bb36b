"""`python -m ampcompare ARGS` as a process of its own, without paying for its imports again.

Most of the suite's time went into starting processes: each `ampcompare` imports torch, its
compiler stack (every optimizer step imports torch._dynamo) and the frameworks, 3 to 5 s of CPU
on the 2-core machines the suite runs on, against well under a second of training. So each test
worker keeps one server that has imported all of that once and forks a child per command; a
small client stands in for the child towards the test:

    [sys.executable, "-I", "-S", __file__, SOCKET, *args]   (see `command`)

The client passes its own stdin, stdout and stderr, its working folder and its environment to
the server, forwards every signal it is sent to the child, and exits as the child did (its exit
code, or the same signal). The child is a real process of its own: it runs the module
`ampcompare` as `python -m` does, installs its own signal handlers, writes its own files and
starts its own children (compare's arms, a job's ranks) with `sys.executable` as usual. What it
does not do is start an interpreter: a test about start-up itself (Ctrl-C while torch is being
imported, what a command imports, the interpreter's teardown) starts `python -m ampcompare`
for real, and so does any command whose environment would change what an interpreter or an
import reads as it starts (`_differs`: `command` starts those afresh, and a child given one by
its parent execs a fresh interpreter in its place).

Run as a script, this file is the client and imports the standard library only.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

# Variables read as an interpreter starts or torch, OpenMP or a framework is imported: a child
# forked from the server would not see a change to these, so a command given one runs afresh.
AT_START = (
    *("PYTHON", "LC_", "LANG", "HOME", "XDG_", "TMP", "TEMP"),
    *("OMP_", "MKL_", "OPENBLAS_", "KMP_", "TORCH", "PYTORCH", "CUDA"),
    *("MPL", "MATPLOTLIB", "ACCELERATE"),
)
# ...except what the child applies itself (the fault hook's path, the rank Lightning reads as
# it is imported) and what torch reads only as its launcher or a process group starts.
HANDLED = ("PYTHONPATH", "TORCHELASTIC_", "TORCH_NCCL_")
FORWARDED = [
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGCONT")
]
PR_SET_PDEATHSIG = 1
FRESH = [sys.executable, "-m", "ampcompare"]  # a command started as a user starts it


# --- the client (a script: the standard library only) ----------------------------------------


def _client(path: str, server: int, args: list[str]) -> None:
    import ctypes

    pending, child = [], []

    def forward(signum, frame):
        if child:
            try:
                os.kill(child[0], signum)
            except ProcessLookupError:
                pass
        else:
            pending.append(signum)

    for s in FORWARDED:
        signal.signal(s, forward)
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # passed on as the others are
    streams = [fd for fd in (0, 1, 2) if _is_open(fd)]  # before the socket takes a free one
    request = {
        "args": args,
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "streams": streams,
        "parent": os.getppid(),
        "session": os.getsid(0) == os.getpid(),
    }
    conn = _connect(path, server)
    if conn is None:  # no server: the command starts afresh, and nothing was started yet
        _fresh(args, pending)
    try:
        socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], streams)
        replies = conn.makefile("r")
        line = replies.readline()
    except OSError:
        line = ""
    if not line:
        _fresh(args, pending)
    child.append(json.loads(line)["pid"])
    for signum in pending:
        forward(signum, None)
    line = replies.readline()
    status = json.loads(line)["status"] if line else -signal.SIGKILL  # the server was killed
    if status >= 0:
        os._exit(status)
    for s in {*FORWARDED, -status} - {signal.SIGKILL}:
        signal.signal(s, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [-status])
    os.kill(os.getpid(), -status)
    os._exit(128 - status)


def _connect(path: str, server: int):
    deadline = time.monotonic() + 180  # the server imports for a few seconds after it starts
    while time.monotonic() < deadline and _alive(server):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
            return conn
        except FileNotFoundError:  # still importing
            conn.close()
            time.sleep(0.05)
        except OSError:  # there and gone
            conn.close()
            return None
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _fresh(args: list[str], pending: list[int]) -> None:
    for s in FORWARDED:
        signal.signal(s, signal.SIG_DFL)
    for signum in pending:
        os.kill(os.getpid(), signum)
    os.execv(sys.executable, [*FRESH, *args])


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# --- the server ------------------------------------------------------------------------------


def _serve(path: str) -> dict:
    """Import what every command imports, then fork a child per request; in the parent, never
    return. In a child, return its request: the caller runs it at the top of the stack."""
    import ctypes
    import selectors

    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # gone with its test worker
    for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):  # a Ctrl-C meant for the suite
        signal.signal(s, signal.SIG_IGN)
    env = dict(os.environ)
    _import_everything()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(64)
    os.rename(path + ".tmp", path)  # clients connect once everything is imported
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    children = {}  # pid -> (its client's connection, whether it leads a session)
    while True:
        for key, _ in sel.select(timeout=0.02):
            if key.fileobj is not listener:  # its client went away (a timeout): so does it
                if key.data in children:
                    _kill(key.data, children[key.data][1])
                continue
            conn, _ = listener.accept()
            try:
                request = {**_receive(conn), "server": path, "server_env": env}
            except (OSError, ValueError):  # a client gone before it asked for anything
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                for fileobj in [listener, conn, *(c for c, _ in children.values())]:
                    fileobj.close()
                sel.close()
                return request
            for fd in request["fds"]:
                os.close(fd)
            children[pid] = (conn, request["session"])
            sel.register(conn, selectors.EVENT_READ, pid)
            try:
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            except OSError:  # gone already: the next select sees it
                pass
        _reap(children, sel)


def _kill(pid: int, session: bool) -> None:
    try:
        os.killpg(pid, signal.SIGKILL) if session else os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _import_everything() -> None:
    import matplotlib  # noqa: F401
    import numpy  # noqa: F401
    import torch._dynamo  # noqa: F401
    import torchvision  # noqa: F401

    import accelerate_impl.train  # noqa: F401
    import ampcompare.cli  # noqa: F401
    import ampcompare.compare  # noqa: F401
    import ampcompare.report  # noqa: F401
    import record.prepare  # noqa: F401
    import fabric_impl.train  # noqa: F401
    import lightning_impl.train  # noqa: F401
    import plain_torch.train  # noqa: F401
    from tests import faults  # noqa: F401


def _reap(children: dict, sel) -> None:
    """Tell each ended child's client how it ended."""
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        conn, _ = children.pop(pid, (None, None))
        if conn is None:
            continue
        try:
            conn.sendall(
                json.dumps({"status": os.waitstatus_to_exitcode(status)}).encode() + b"\n"
            )
        except OSError:
            pass
        sel.unregister(conn)
        conn.close()


def _receive(conn) -> dict:
    conn.settimeout(10)  # a client stopped half-way must not stall the others
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    while not data.endswith(b"\n"):
        more = conn.recv(1 << 20)
        if not more:
            break
        data += more
    request = json.loads(data)
    request["fds"] = fds
    return request


def _become(request: dict) -> None:
    """In the forked child: take the client's streams, folder, environment and command line,
    as `python -m ampcompare ARGS` started there would have them."""
    import ctypes

    server = os.getppid()
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # fork cleared the server's
    if os.getppid() != server:
        os._exit(1)
    if request["session"]:  # as the client was started: compare's arms, a job's ranks
        os.setsid()
    for target in (0, 1, 2):
        if target in request["streams"]:
            fd = request["fds"][request["streams"].index(target)]
            os.dup2(fd, target)
            os.close(fd)
        else:  # closed in the client: closed here too
            os.close(target)
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        _stdio(fd, name)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for s in FORWARDED:
        signal.signal(s, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    if _differs(request["env"], request["server_env"]) or _cuda_started():
        os.execv(sys.executable, [*FRESH, *request["args"]])  # what this command starts, say
    _as_started_there(request)


def _cuda_started() -> bool:
    """Whether the server had started CUDA before it forked (an import that does is a bug of
    its own): CUDA cannot be used in a child forked after that, so the child starts afresh."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_initialized()


def _differs(env: dict, server_env: dict) -> bool:
    """Whether `env` changes something an interpreter or an import reads as it starts."""
    names = {n for n in set(env) | set(server_env) if not n.startswith(HANDLED)}
    return any(n.startswith(AT_START) and env.get(n) != server_env.get(n) for n in names)


def _as_started_there(request: dict) -> None:
    import importlib.util

    sys.argv = [importlib.util.find_spec("ampcompare.__main__").origin, *request["args"]]
    # python -m puts the folder first, then PYTHONPATH, then what the installation has
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    old = [p for p in request["server_env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [os.getcwd(), *extra, *[p for p in sys.path[1:] if p not in old]]
    real, parent = os.getppid, request["parent"]
    os.getppid = lambda: parent  # the process that started the client: compare, a launcher
    os.register_at_fork(after_in_child=lambda: setattr(os, "getppid", real))
    from lightning_fabric.utilities import rank_zero

    rank_zero.rank_zero_only.rank = rank_zero._get_rank() or 0  # read as Lightning is imported
    # What it starts in turn (compare's arms, a job's ranks) is forked from the server too.
    from ampcompare import compare, launch

    compare.ARM_COMMAND = launch.RANK_COMMAND = _client_command(request["server"], real())
    from tests import faults

    if faults.HOOK in extra and os.environ.get(faults.ENV):  # tests/fault_hook/sitecustomize.py
        faults.install_from_env()


def _stdio(fd: int, name: str) -> None:
    """sys.stdin/stdout/stderr made afresh over the new descriptors, as an interpreter makes
    them at start (Python/pylifecycle.c: create_stdio), with the server's encoding, errors and
    buffering (the same environment chose them)."""
    import io

    old = getattr(sys, f"__{name}__")
    if old is None or not _is_open(fd):
        setattr(sys, name, None)
        return
    write = name != "stdin"
    unbuffered = write and old.write_through
    buffering = 0 if unbuffered else -1
    binary = io.open(fd, "wb" if write else "rb", buffering=buffering, closefd=False)
    stream = io.TextIOWrapper(
        binary,
        encoding=old.encoding,
        errors=old.errors,
        newline="\n",
        line_buffering=write and (name == "stderr" or os.isatty(fd)),
        write_through=unbuffered,
    )
    setattr(sys, name, stream)
    setattr(sys, f"__{name}__", stream)


# --- for the tests ---------------------------------------------------------------------------

_server = {}


def start() -> None:
    """Start this worker's server (it imports for a few seconds; clients wait for it)."""
    import subprocess
    import tempfile

    folder = tempfile.mkdtemp(prefix="ampcompare-fork-")  # a socket's path has 107 bytes
    path = os.path.join(folder, "fork.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.forkserver", "--serve", path],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    _server.update(path=path, proc=proc, env=dict(os.environ), folder=folder)


def command(env=None) -> list[str]:
    """The command that runs `ampcompare` (append its arguments) in a process of its own:
    forked from the server when there is one and `env` (default: this process's) changes
    nothing read at start-up, else a fresh `python -m ampcompare`."""
    if not _server or _server["proc"].poll() is not None:
        return FRESH
    if _differs(dict(os.environ if env is None else env), _server["env"]):
        return FRESH
    return _client_command(_server["path"], _server["proc"].pid)


def _client_command(path: str, server: int) -> list[str]:
    return [sys.executable, "-I", "-S", os.path.abspath(__file__), path, str(server)]


def stop() -> None:
    if _server:
        import shutil

        _server["proc"].kill()
        _server["proc"].wait()
        shutil.rmtree(_server["folder"], ignore_errors=True)
        _server.clear()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:  # python -m tests.forkserver --serve SOCKET
        request = _serve(sys.argv[2])
        _become(request)
        import runpy

        runpy.run_module("ampcompare", run_name="__main__", alter_sys=True)
        sys.exit(0)
    _client(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
