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
for real, and so does any command whose environment would change how the interpreter or torch
starts (`command` decides).

Run as a script, this file is the client and imports the standard library only.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

# Variables read as an interpreter, torch or OpenMP start: a child forked from the server would
# not see a change to these, so a command given one that differs runs as a fresh process.
AT_START = ("PYTHON", "LC_", "LANG", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "TORCH", "CUDA")
# ...except what the fault hook (tests/fault_hook) reads, which the child applies itself.
HANDLED = ("PYTHONPATH",)
FORWARDED = [
    s
    for s in signal.Signals
    if s not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGPIPE)
    and s.name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGCONT")
]


# --- the client (a script: the standard library only) ----------------------------------------


def _client(path: str, args: list[str]) -> None:
    deadline = time.monotonic() + 180  # the server imports for a few seconds after it starts
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
            break
        except OSError:
            conn.close()
            if time.monotonic() > deadline:
                sys.stderr.write(f"forkserver: no server at {path}\n")
                os._exit(99)
            time.sleep(0.05)
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG, passed on as the others are
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
    streams = [fd for fd in (0, 1, 2) if _is_open(fd)]
    request = {
        "args": args,
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "streams": streams,
        "parent": os.getppid(),
    }
    socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], streams)
    replies = conn.makefile("r")
    line = replies.readline()
    if not line:
        sys.stderr.write("forkserver: the server ended before it started the command\n")
        os._exit(99)
    child.append(json.loads(line)["pid"])
    for signum in pending:
        forward(signum, None)
    line = replies.readline()
    status = json.loads(line)["status"] if line else -signal.SIGKILL
    if status >= 0:
        os._exit(status)
    for s in FORWARDED:
        signal.signal(s, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [-status])
    os.kill(os.getpid(), -status)
    os._exit(128 - status)


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

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: gone with its test worker
    _import_everything()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(64)
    os.rename(path + ".tmp", path)  # clients connect once everything is imported
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    children = {}  # pid -> its client's connection
    while True:
        for key, _ in sel.select(timeout=0.02):
            if key.fileobj is listener:
                conn, _ = listener.accept()
                request = {**_receive(conn), "server": path}
                pid = os.fork()
                if pid == 0:
                    for fileobj in [listener, conn, *children.values()]:
                        fileobj.close()
                    sel.close()
                    return request
                for fd in request["fds"]:
                    os.close(fd)
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
                children[pid] = conn
                sel.register(conn, selectors.EVENT_READ, pid)
            elif key.data in children:  # its client went away (a test's timeout): so does it
                try:
                    os.kill(key.data, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        _reap(children, sel)


def _import_everything() -> None:
    import matplotlib  # noqa: F401
    import numpy  # noqa: F401
    import torch._dynamo  # noqa: F401
    import torchvision  # noqa: F401

    import accelerate_impl.train  # noqa: F401
    import ampcompare.cli  # noqa: F401
    import ampcompare.compare  # noqa: F401
    import ampcompare.report  # noqa: F401
    import common.prepare  # noqa: F401
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
        conn = children.pop(pid, None)
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
    import importlib.util

    sys.argv = [importlib.util.find_spec("ampcompare.__main__").origin, *request["args"]]
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:1] = [os.getcwd(), *[p for p in extra if p not in sys.path]]
    parent = request["parent"]
    os.getppid = lambda: parent  # the process that started the client: compare, a launcher
    # What it starts in turn (compare's arms, a job's ranks) is forked from the server too.
    from ampcompare import compare, launch

    compare.ARM_COMMAND = launch.RANK_COMMAND = _client_command(request["server"])
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
    fresh = [sys.executable, "-m", "ampcompare"]
    if not _server or _server["proc"].poll() is not None:
        return fresh
    env = os.environ if env is None else env
    names = (set(env) | set(_server["env"])) - set(HANDLED)
    for name in names:
        if name.startswith(AT_START) and env.get(name) != _server["env"].get(name):
            return fresh
    return _client_command(_server["path"])


def _client_command(path: str) -> list[str]:
    return [sys.executable, "-I", "-S", os.path.abspath(__file__), path]


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
    _client(sys.argv[1], sys.argv[2:])
