"""The sandboxed child: lock this process down, then run ``program.py`` from the working directory.

Started by :func:`fedplora.tasks.sandbox.run_python` as ``python -I -B sandbox_child.py LIMITS_JSON``
with a fresh temporary directory as its working directory. Every restriction is applied here,
before one line of the untrusted program runs, so nothing in the (multi-threaded) parent needs a
``preexec_fn``. What each layer does and does not guarantee: docs/tasks.md, "The code sandbox".
Only the standard library is used; the steps taken are written as one JSON line to the pipe
whose descriptor the parent passes in ``report_fd``.
"""

import ctypes
import ctypes.util
import json
import os
import resource
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_NO_NEW_PRIVS = 38
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446  # all arches
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_ABI1 = (1 << 13) - 1  # execute ... make_sym
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
NOBODY = 65534
PR_SET_KEEPCAPS = 8
LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_DAC_READ_SEARCH = 2

libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
libc.syscall.restype = ctypes.c_long


class RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _err() -> str:
    return os.strerror(ctypes.get_errno())


def isolate_network() -> str:
    """A new, empty network namespace: no interface but a loopback that is down."""
    if libc.unshare(CLONE_NEWNET) == 0:
        return "namespace"
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:  # unprivileged, where user namespaces are allowed
        return "user+net namespace"
    return f"none ({_err()})"


def landlock(workdir: str) -> str:
    """Writes only under ``workdir``; reads and execution anywhere; no TCP; signals only inside."""
    abi = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        return f"unavailable ({_err()})"
    fs = FS_ABI1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0) | (FS_IOCTL_DEV if abi >= 5 else 0)
    attr = RulesetAttr(fs, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
                       SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        return f"failed ({_err()})"
    for path, access in (("/", FS_EXECUTE | FS_READ_FILE | FS_READ_DIR), (workdir, fs)):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = PathBeneathAttr(access, fd)
        if libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0) != 0:
            return f"failed ({_err()})"
        os.close(fd)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return f"failed ({_err()})"
    if libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) != 0:
        return f"failed ({_err()})"
    os.close(ruleset)
    return f"abi {abi}"


def set_limits(limits: dict) -> None:
    mem = int(limits["memory_mb"]) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    cpu = int(limits["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    fsize = int(limits["file_mb"]) * 2**20
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(limits["open_files"]),) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # no fork, no threads (not enforced for root)


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_privileges(workdir: str) -> str:
    """Root becomes ``nobody``, keeping one capability: reading files (the interpreter may live
    under /root). Nobody cannot signal the parent's processes nor fork past RLIMIT_NPROC."""
    if os.geteuid() != 0:
        return f"uid {os.geteuid()}"
    os.chown(workdir, NOBODY, NOBODY)
    if libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
        raise OSError(f"sandbox: prctl(PR_SET_KEEPCAPS) failed ({_err()})")
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    data = (CapData * 2)()
    data[0].effective = data[0].permitted = 1 << CAP_DAC_READ_SEARCH
    if libc.capset(ctypes.byref(CapHeader(LINUX_CAPABILITY_VERSION_3, 0)), data) != 0:
        raise OSError(f"sandbox: capset failed ({_err()})")
    return f"uid {NOBODY} (nobody), capabilities: dac_read_search only"


def python_guard(workdir: str) -> None:
    """An audit hook: the last layer, and the only one where the kernel offers none of the above."""
    root = os.path.realpath(workdir) + os.sep
    blocked = {"socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "subprocess.Popen",
               "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.kill",
               "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "pty.spawn", "os.startfile"}
    path_events = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
                   "os.link", "os.symlink", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}

    def outside(path) -> bool:
        if isinstance(path, int):
            return False
        try:
            full = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return True
        return not (full + os.sep).startswith(root)

    def hook(event, args):
        if event in blocked:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and args and args[0] is not None:
            mode, flags = args[1] or "r", args[2] or 0
            writes = any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if writes and outside(args[0]):
                raise PermissionError(f"sandbox: writing {args[0]!r} outside the working directory")
        elif event in path_events and args and any(outside(a) for a in args[:2] if isinstance(a, (str, bytes))):
            raise PermissionError(f"sandbox: {event} outside the working directory")

    sys.addaudithook(hook)


def main() -> None:
    limits = json.loads(sys.argv[1])
    workdir = os.getcwd()
    with open("program.py", encoding="utf-8") as f:
        source = f.read()
    code = compile(source, "program.py", "exec")
    steps = {"network": isolate_network() if limits.get("network_namespace", True) else "not requested"}
    set_limits(limits)
    steps["filesystem"] = landlock(workdir) if limits.get("landlock", True) else "not requested"
    steps["user"] = drop_privileges(workdir)
    steps["python_guard"] = bool(limits.get("python_guard", True))
    if limits.get("require_isolation") and not (steps["network"].endswith("namespace")
                                                 and steps["filesystem"].startswith("abi")):
        os.write(limits["report_fd"], (json.dumps(steps) + "\n").encode())
        print(f"sandbox: isolation unavailable ({steps}); refusing to run", file=sys.stderr)
        os._exit(97)
    os.write(limits["report_fd"], (json.dumps(steps) + "\n").encode())
    os.close(limits["report_fd"])
    if steps["python_guard"]:
        python_guard(workdir)
    sys.argv = ["program.py"]
    sys.path[:0] = [workdir]
    exec(code, {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__})


if __name__ == "__main__":
    main()
