"""The sandbox's command line: the bubblewrap argv that builds its root file system, the
trampoline that sets limits and drops to the sandbox user inside it, and the environment
built from scratch. How and why: bot/sandbox/__init__.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bot.settings import SandboxSettings

WORKSPACE = "/workspace"  # the job's copy, inside the sandbox
ENV_DIR = "/env"  # a repository's own environment, inside the sandbox
HOME = "/home/sandbox"
BASE_PATH = "/usr/local/bin:/usr/bin:/bin"
OUTPUT_KEEP_BYTES = 64 * 1024  # the tail of the output kept in memory; the rest is counted
NPROC_LIMIT = 256  # processes and threads of the sandbox user at once
NOFILE_LIMIT = 1024
FSIZE_LIMIT = 1024**3
_PROBE_TIMEOUT_SECONDS = 20.0

# Files of /etc a program may need, read-only; everything else of /etc stays out.
_ETC = (
    "alternatives", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf",
    "ssl", "ca-certificates", "ca-certificates.conf", "mime.types", "protocols", "services",
    "host.conf", "gai.conf", "os-release", "debian_version", "timezone",
)
_ETC_NETWORK = ("hosts", "resolv.conf")  # set-up steps with network only
_ROOT_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


# ---------------------------------------------------------------- the trampoline

# Runs first inside the sandbox, as a separate program (not a preexec_fn, which is unsafe in a
# threaded process): sets hard resource limits, then — when bubblewrap ran as root — drops to
# the sandbox uid with no capabilities and enters a user namespace of its own, then execs.
TRAMPOLINE = r"""
import ctypes, os, resource, sys
a = sys.argv
uid, gid, mem, nproc, fsize, nofile, drop = (int(x) for x in a[1:8])
def limit(res, value):
    soft, hard = resource.getrlimit(res)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(res, (value, value))
for res, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CORE, 0),
                   (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_FSIZE, fsize),
                   (resource.RLIMIT_NOFILE, nofile)):
    limit(res, value)
if drop:
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, CLONE_NEWUSER = 38, 24, 0x10000000
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        sys.exit("[sandbox] prctl(NO_NEW_PRIVS) failed")
    cap = 0
    while libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
        cap += 1
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid:
        sys.exit("[sandbox] could not drop to the sandbox user")
    libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: the uid change made /proc/self root's
    if libc.unshare(CLONE_NEWUSER) != 0:
        sys.exit("[sandbox] unshare(CLONE_NEWUSER) failed: errno %d" % ctypes.get_errno())
    with open("/proc/self/uid_map", "w") as f:
        f.write("%d %d 1\n" % (uid, uid))
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/gid_map", "w") as f:
        f.write("%d %d 1\n" % (gid, gid))
    cap = 0  # the new namespace gave a full bounding set again: empty it
    while libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
        cap += 1
os.execvp(a[8], a[8:])
"""


# ---------------------------------------------------------------- building the command


def python_roots() -> list[str]:
    """Directories the sandbox needs for codeloop's Python (venv and base installation)."""
    roots: list[str] = []
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        path = os.path.realpath(prefix)
        if path.startswith("/usr/") or path == "/usr":
            continue
        if path not in roots:
            roots.append(path)
    # A venv's python is a symlink to the base interpreter; follow it too.
    real = os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))
    if not real.startswith("/usr") and real not in roots:
        roots.append(real)
    return sorted(roots)


def passwd_files(uid: int, gid: int) -> tuple[str, str]:
    passwd = f"root:x:0:0:root:/root:/bin/sh\nsandbox:x:{uid}:{gid}:codeloop sandbox:{HOME}:/bin/sh\n"
    group = f"root:x:0:\nsandbox:x:{gid}:\n"
    return passwd, group


def bwrap_argv(
    bwrap: str, root: Path, workdir: Path, uid: int, settings: SandboxSettings, *,
    network: bool, env_dir: Path | None, env_writable: bool, as_root: bool,
) -> list[str]:
    gid = uid
    argv = [
        bwrap, "--die-with-parent", "--new-session",
        "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--hostname", "codeloop-sandbox",
    ]
    if not network:
        argv.append("--unshare-net")
    if as_root:
        # Only what the trampoline needs to drop to the sandbox uid; it then drops these too.
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
                 "--cap-add", "CAP_SETPCAP"]
    else:
        argv += ["--unshare-user", "--uid", str(uid), "--gid", str(gid), "--disable-userns",
                 "--cap-drop", "ALL"]
    argv += ["--ro-bind", "/usr", "/usr", "--perms", "0755", "--dir", "/etc",
             "--perms", "0755", "--dir", "/home"]
    # The private /tmp and HOME first: what is bound read-only below may live under them on
    # the host (a virtualenv in a clone under /tmp) and must not be hidden by them.
    argv += [
        "--proc", "/proc", "--dev", "/dev",
        "--perms", "1777", "--tmpfs", "/dev/shm",
        "--bind", str(root / "tmp"), "/tmp",
        "--bind", str(root / "home"), HOME,
    ]
    read_only = [*python_roots(), *(os.path.realpath(p) for p in settings.read_only_paths)]
    # bubblewrap gives the directories it creates on the way the host's modes (/root is 0700):
    # create them traversable first, or the sandbox user could not reach what is bound below.
    parents = {str(parent) for path in read_only for parent in Path(path).parents}
    for parent in sorted(parents - {"/", "/etc", "/home", "/tmp", HOME},
                         key=lambda p: p.count("/")):
        argv += ["--perms", "0755", "--dir", parent]
    for name in _ROOT_LINKS:
        host = Path("/") / name
        if host.is_symlink():
            argv += ["--symlink", os.readlink(host), f"/{name}"]
        elif host.is_dir():
            argv += ["--ro-bind", str(host), f"/{name}"]
    for name in _ETC + (_ETC_NETWORK if network else ()):
        argv += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    for name in os.listdir("/etc"):
        if name.startswith("python3"):
            argv += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    argv += ["--ro-bind", str(root / "passwd"), "/etc/passwd",
             "--ro-bind", str(root / "group"), "/etc/group"]
    for path in read_only:
        argv += ["--ro-bind", path, path]
    argv += ["--bind", str(workdir), WORKSPACE]
    if env_dir is not None:
        argv += ["--bind" if env_writable else "--ro-bind", str(env_dir), ENV_DIR]
    argv += ["--chdir", WORKSPACE, "--"]
    return argv


def sandbox_env(settings: SandboxSettings, env_dir: Path | None) -> dict[str, str]:
    path = [f"{ENV_DIR}/bin"] if env_dir is not None else []
    path.append(str(Path(sys.executable).parent))
    env = {
        "PATH": ":".join([*path, BASE_PATH]),
        "HOME": HOME,
        "USER": "sandbox",
        "LOGNAME": "sandbox",
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if env_dir is not None:
        env["VIRTUAL_ENV"] = ENV_DIR
    return env
