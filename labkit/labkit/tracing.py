"""What a real run did, seen from outside with strace: the commands a process started itself
and the files it created or renamed into place (its threads included, its children's own work
not: a child is counted as its command). Used to hold a run against its --dry-run."""

import ast
import glob
import os
import re
import shutil
import tempfile
from typing import Dict, List, NamedTuple, Sequence, Set, Tuple

TRACED_CALLS = "execve,rename,renameat,renameat2,openat,creat,clone,clone3,vfork,fork"

_LINE = re.compile(r"^(?P<call>\w+)\((?P<args>.*)\)\s+= (?P<ret>-?\d+)(?: .*)?$")
_DETACHED = re.compile(r"^execve\((?P<args>.*) <detached \.\.\.>$")  # a successful execve
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')


class Trace(NamedTuple):
    commands: List[Tuple[str, ...]]  # argv of each command the process started, in order
    files: List[str]  # paths it created or renamed into place, in order (absolute)


def strace_argv(argv: Sequence[str], out_prefix: str) -> List[str]:
    """argv run under strace, one output file per process (out_prefix.PID)."""
    strace = shutil.which("strace") or "/usr/bin/strace"
    # -b execve: a child is let go at its execve (its command is all we want of it), so that a
    # daemon it starts (tincd) does not keep strace, and the run, waiting
    return [strace, "-f", "-ff", "-qq", "-b", "execve", "-s", "65536",
            "-e", "trace=" + TRACED_CALLS, "-o", out_prefix] + list(argv)


def _c_string(text: str) -> str:
    """A string as strace prints it (C escapes), decoded."""
    return ast.literal_eval('"' + text + '"') if "\\" in text else text


def _strings(args: str) -> List[str]:
    return [_c_string(s) for s in _STRING.findall(args)]


def _calls(path: str) -> List[Tuple[str, str, int]]:
    """(call, arguments, return value) of each finished call in one process's trace file."""
    calls = []
    with open(path, errors="replace") as handle:
        for line in handle:
            match = _LINE.match(line.rstrip("\n"))
            if match:
                calls.append((match.group("call"), match.group("args"), int(match.group("ret"))))
                continue
            match = _DETACHED.match(line.rstrip("\n"))
            if match:
                calls.append(("execve", match.group("args"), 0))
    return calls


def read_trace(out_prefix: str, script: str) -> Trace:
    """The Trace of the process that ran `script` (the one whose execve names it)."""
    per_pid: Dict[int, List[Tuple[str, str, int]]] = {}
    for path in glob.glob(glob.escape(out_prefix) + ".*"):
        per_pid[int(path.rsplit(".", 1)[1])] = _calls(path)
    main = [pid for pid, calls in per_pid.items()
            if any(c == "execve" and r == 0 and script in _strings(a)[1:] for c, a, r in calls)]
    if len(main) != 1:
        raise AssertionError("no single process ran %s in the trace (%s)" % (script, main))
    own: Set[int] = {main[0]}
    children: List[int] = []
    # threads first (clone with CLONE_THREAD), then the processes they started
    for pid in sorted(own):
        for call, args, ret in per_pid[pid]:
            if call in ("clone", "clone3") and "CLONE_THREAD" in args and ret > 0:
                own.add(ret)
    files: List[str] = []
    for pid in sorted(own):
        for call, args, ret in per_pid.get(pid, []):
            if ret < 0:
                continue
            if call in ("clone", "clone3", "vfork", "fork") and "CLONE_THREAD" not in args:
                children.append(ret)
            elif call.startswith("rename"):
                paths = [s for s in _strings(args)]
                files.append(paths[-1])
            elif (call == "openat" and "O_CREAT" in args) or call == "creat":
                files.append(_strings(args)[0])
    commands = []
    for child in sorted(children):
        for call, args, ret in per_pid.get(child, []):
            if call == "execve" and ret == 0:
                commands.append(tuple(_strings(args)[1:]))
                break
    # Python's bytecode cache (a module imported for the first time) is the interpreter's doing
    return Trace(commands, [f for f in files if "/__pycache__/" not in f])


class TraceDir:
    """A private directory for strace's per-process files; removed on exit."""

    def __enter__(self) -> str:
        self.path = tempfile.mkdtemp(prefix="labkit-trace-")
        os.chmod(self.path, 0o700)
        return os.path.join(self.path, "trace")

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
