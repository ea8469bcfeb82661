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


SYSTEM_LIB_DIRS = ("/lib", "/lib32", "/lib64", "/libx32", "/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/libx32")
SITE = {"site-packages", "dist-packages"}
READ_FILES = ("/etc/ld.so.cache", "/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")


def _beneath(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def read_roots(workdir: str) -> tuple[list[str], list[str], list[str], list[str]]:
    """What the program may read, as real paths: ``(trees, single files, folders it may only list,
    a short description of all three)``.

    Trees (everything beneath): the working directory; each entry of the standard library (the
    folder of ``os.py``) but ``site-packages``; the entries of ``sys.path`` inside the base
    interpreter's prefix that are not site-packages (``lib-dynload``, a ``pythonXY.zip``); the
    system's shared-library folders (``/lib``, ``/usr/lib``, ``/lib64``, ... as they exist) for the
    libraries extension modules load. Files: the loader's cache, ``/dev/null``, ``/dev/zero``,
    ``/dev/urandom``, ``/dev/random``, and the shared libraries directly in ``<base prefix>/lib``
    (where a pyenv or conda interpreter keeps the libraries its extension modules link to).
    Listed only: the standard library's folder (imports list it). Not a virtual environment, not
    site-packages, not the project the interpreter was started from.
    """
    real = os.path.realpath
    stdlib = real(os.path.dirname(os.__file__))
    dirs = [real(workdir)]
    try:  # the standard library, less the base interpreter's own site-packages inside it
        entries = [os.path.join(stdlib, n) for n in sorted(os.listdir(stdlib)) if n not in SITE]
        dirs += [real(e) if os.path.islink(e) else e for e in entries]
    except OSError:
        pass
    prefixes = {real(sys.base_prefix), real(sys.base_exec_prefix)}
    for entry in sys.path:
        full = real(entry or ".")
        parts = set(full.split(os.sep))
        if (any(_beneath(full, p) for p in prefixes) and not _beneath(stdlib, full)  # listed above
                and not parts & SITE and os.path.exists(full)):
            dirs.append(full)
    dirs += [real(d) for d in SYSTEM_LIB_DIRS if os.path.isdir(d)]
    unique_dirs = []
    for d in sorted(set(dirs), key=len):  # drop a folder beneath one already allowed
        if not any(_beneath(d, u) for u in unique_dirs):
            unique_dirs.append(d)

    def new(path: str) -> bool:
        return not any(_beneath(path, d) for d in unique_dirs)

    files = [f for f in dict.fromkeys(real(f) for f in READ_FILES if os.path.exists(f)) if new(f)]
    inside = [d for d in unique_dirs if os.path.dirname(d) == stdlib]
    described = [d for d in unique_dirs if d not in inside] + files
    if inside:
        described.append(f"{stdlib}/* ({len(inside)} entries, no site-packages)")
    for lib in sorted({os.path.join(p, "lib") for p in prefixes}):
        try:
            names = sorted(os.listdir(lib))
        except OSError:
            continue
        libs = [os.path.join(lib, n) for n in names if ".so" in n and os.path.isfile(os.path.join(lib, n))]
        libs = [f for f in libs if new(f)]
        if libs:
            files += libs
            described.append(f"{lib}/*.so* ({len(libs)} files)")
    listed = [stdlib] if inside else []
    return unique_dirs, files, listed, described


def landlock(workdir: str, read_dirs: list[str], read_files: list[str], list_dirs: list[str]) -> str:
    """Writes only under ``workdir``; reads only beneath ``read_dirs`` and of ``read_files``, listing
    ``list_dirs``; executing nothing; no TCP; signals only inside."""
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
    work = os.path.realpath(workdir)
    dev_null = fs & (FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE | FS_IOCTL_DEV)
    rules = [(work, fs & ~FS_EXECUTE)]
    rules += [(d, FS_READ_FILE | (FS_READ_DIR if os.path.isdir(d) else 0)) for d in read_dirs if d != work]
    rules += [(f, dev_null if f == "/dev/null" else FS_READ_FILE) for f in read_files]
    rules += [(d, FS_READ_DIR) for d in list_dirs]
    for path, access in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue  # gone since it was listed: nothing to allow
        rule = PathBeneathAttr(access, fd)
        added = libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0)
        os.close(fd)
        if added != 0:
            os.close(ruleset)
            return f"failed ({_err()})"
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


def python_guard(workdir: str, read_dirs: list[str], read_files: list[str], list_dirs: list[str]) -> None:
    """An audit hook: the last layer, and the only one where the kernel offers none of the above.

    Refuses sockets, subprocesses, ``ctypes``, signals, writes outside ``workdir`` and reads (``open``
    for reading, ``os.listdir``, ``os.scandir``) outside ``read_dirs``, ``read_files`` (and listing
    ``list_dirs``)."""
    root = os.path.realpath(workdir) + os.sep
    readable_dirs = tuple(d.rstrip(os.sep) + os.sep for d in read_dirs)
    readable_files = frozenset(read_files)
    listable = frozenset(list_dirs)
    blocked = {"socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "subprocess.Popen",
               "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.kill",
               "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "pty.spawn", "os.startfile"}
    path_events = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
                   "os.link", "os.symlink", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
    list_events = {"os.listdir", "os.scandir"}

    def real(path) -> str | None:
        try:
            return os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return None

    def outside(path) -> bool:
        if isinstance(path, int):
            return False
        full = real(path)
        return full is None or not (full + os.sep).startswith(root)

    def unreadable(path, also=frozenset()) -> bool:
        if isinstance(path, int):
            return False  # an open descriptor: its opening was checked
        full = real(path)
        return full is None or not (full in readable_files or full in also
                                    or (full + os.sep).startswith(readable_dirs))

    def hook(event, args):
        if event in blocked:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and args and args[0] is not None:
            mode, flags = args[1] or "r", args[2] or 0
            writes = any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if writes and outside(args[0]) and real(args[0]) != "/dev/null":
                raise PermissionError(f"sandbox: writing {args[0]!r} outside the working directory")
            if not writes and unreadable(args[0]):
                raise PermissionError(f"sandbox: reading {args[0]!r} outside the working directory "
                                      "and the interpreter's own files")
        elif event in list_events and args and args[0] is not None and unreadable(args[0], listable):
            raise PermissionError(f"sandbox: listing {args[0]!r} outside the working directory "
                                  "and the interpreter's own files")
        elif event in path_events and args and any(outside(a) for a in args[:2] if isinstance(a, (str, bytes))):
            raise PermissionError(f"sandbox: {event} outside the working directory")

    sys.addaudithook(hook)


def main() -> None:
    limits = json.loads(sys.argv[1])
    workdir = os.getcwd()
    with open("program.py", encoding="utf-8") as f:
        source = f.read()
    code = compile(source, "program.py", "exec")
    read_dirs, read_files, list_dirs, readable = read_roots(workdir)
    steps = {"network": isolate_network() if limits.get("network_namespace", True) else "not requested"}
    set_limits(limits)
    steps["filesystem"] = (landlock(workdir, read_dirs, read_files, list_dirs) if limits.get("landlock", True)
                           else "not requested")
    steps["user"] = drop_privileges(workdir)
    steps["python_guard"] = bool(limits.get("python_guard", True))
    layers = [name for name, on in (("landlock", steps["filesystem"].startswith("abi")),
                                    ("python_guard", steps["python_guard"])) if on]
    steps["reads"] = " + ".join(layers) if layers else "unrestricted"
    steps["readable"] = readable if layers else ["anything"]
    if limits.get("require_isolation") and not (steps["network"].endswith("namespace")
                                                 and steps["filesystem"].startswith("abi")):
        os.write(limits["report_fd"], (json.dumps(steps) + "\n").encode())
        print(f"sandbox: isolation unavailable ({steps}); refusing to run", file=sys.stderr)
        os._exit(97)
    os.write(limits["report_fd"], (json.dumps(steps) + "\n").encode())
    os.close(limits["report_fd"])
    if steps["python_guard"]:
        python_guard(workdir, read_dirs, read_files, list_dirs)
    sys.argv = ["program.py"]
    # only what may be read: an import from site-packages or the project is "not found", not "denied"
    sys.path[:] = [workdir] + [p for p in sys.path if os.path.realpath(p or ".") in list_dirs
                               or any(_beneath(os.path.realpath(p or "."), d) for d in read_dirs)]
    sys.path_importer_cache.clear()
    exec(code, {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__})


if __name__ == "__main__":
    main()
