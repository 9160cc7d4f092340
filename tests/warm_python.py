"""A warm Python interpreter that runs ``python -m MODULE ARGS`` / ``python SCRIPT ARGS`` commands in forks of itself.

Started as ``python tests/warm_python.py`` with the environment and working directory the commands get, it imports
only what every documented command imports first (``torch``, ``monai``: about 7 s a process on 2 cores) and prints
one ``ready`` line. It then reads requests, one JSON line each on stdin: ``{"argv": [...], "cwd": ..., "log": ...}``
(``argv`` as after ``python``). For each it forks a child in a new session (its process group can be stopped), which
becomes what ``python ARGV`` would be: ``sys.argv``, ``sys.path[0]``, the working directory, stdin from
``/dev/null``, stdout and stderr to ``log``, the module or script run as ``__main__``, exit status as Python sets it
(``SystemExit``, a traceback and 1 for an uncaught exception), ``atexit`` handlers run. The interpreter answers one
JSON line ``{"pid": pid}`` when the child starts and ``{"rc": status}`` when it ends (a signal ``N``: ``-N``).

The interpreter refuses to serve (it prints ``unfit`` and the reason, and exits) when importing printed anything,
configured logging, or imported the bundle or the libraries whose import-time warnings the bundle filters: a child
would then not print what a fresh process prints.
"""

from __future__ import annotations

import io
import json
import os
import sys

WARM = ("numpy", "torch", "monai", "monai.bundle.scripts")
#: modules a fresh ``python`` command imports itself (their import-time messages must reach the child's log)
NOT_WARM = ("bundle", "timm", "medsam_lite", "nvflare", "monailabel")


def _warm_up() -> str | None:
    """Import ``WARM``; returns why the interpreter is unfit to stand in for a fresh one, or None."""
    import importlib
    import logging

    captured = io.StringIO()
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = captured
    try:
        for name in WARM:
            importlib.import_module(name)
    finally:
        sys.stdout, sys.stderr = stdout, stderr
    if captured.getvalue():
        return f"importing {WARM} printed: {captured.getvalue()[:500]!r}"
    if logging.getLogger().handlers:
        return f"importing {WARM} configured the root logger: {logging.getLogger().handlers}"
    imported = [m for m in NOT_WARM if m in sys.modules]
    if imported:
        return f"importing {WARM} imported {imported}"
    return None


def _child(request: dict, replies) -> int:
    """In the forked child: become ``python *argv`` and run it; returns the exit status."""
    import atexit
    import runpy
    import threading
    import traceback

    replies.close()
    os.setsid()
    os.chdir(request["cwd"])
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(null)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    argv = request["argv"]
    status = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as stop:
        if stop.code is None:
            status = 0
        elif isinstance(stop.code, int):
            status = stop.code
        else:
            print(stop.code, file=sys.stderr)
            status = 1
    except BaseException:
        traceback.print_exc()
        status = 1
    try:
        threading._shutdown()  # what the interpreter does at exit: wait for non-daemon threads
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return status


def main() -> None:
    unfit = _warm_up()
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    if unfit:
        print(json.dumps({"unfit": unfit}), file=replies)
        return
    print(json.dumps({"ready": list(WARM)}), file=replies)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                status = _child(request, replies)
            finally:
                os._exit(status)
        print(json.dumps({"pid": pid}), file=replies)
        _, code = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(code)}), file=replies)


if __name__ == "__main__":
    main()
