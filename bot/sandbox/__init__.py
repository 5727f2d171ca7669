"""The sandbox every piece of repository code runs in (tests, set-up steps, HumanEval).

Repository code is hostile until proven otherwise: a model wrote part of it, in answer to
text anyone may write, on a machine that holds the bot's keys. So it runs under bubblewrap:

- new user, PID, mount, IPC, UTS, cgroup and network namespaces; no capabilities; a new
  session; ``--die-with-parent``; ``no_new_privs``;
- as an unprivileged user: when codeloop runs as root, each sandbox running at once gets a
  host uid of its own (from ``sandbox.uid``'s range), and bubblewrap starts with just enough
  capability to let the trampoline (bot/sandbox/command.py) drop to it and enter a user
  namespace of its own; otherwise bubblewrap's own user namespace does it;
- a root file system built from nothing: ``/usr`` (and its ``/bin``/``/lib`` links), a few
  files of ``/etc``, the Python environment, all read-only; a fresh ``/proc``; a minimal
  ``/dev``; a private ``/tmp`` and ``HOME``; the job's private copy at ``/workspace`` as the
  only writable directory (plus ``/env`` during a set-up step). Nothing of CODELOOP_HOME,
  other workspaces, the user's repository, key files, ``/run`` or the host's ``/proc`` exists
  in there;
- limits on time, address space, processes, file size and open files, inherited by every
  process the command starts, and, where the host allows a control group, one memory and
  process limit for the sandbox as a whole (bot/sandbox/cgroup.py); the PID namespace dies
  with its first process, so the command and every descendant are gone when it ends or
  times out;
- an environment built from scratch: no variable of the bot's reaches it;
- no network (a network namespace with loopback only); set-up steps get HTTPS to the allowed
  package hosts through a proxy outside (bot/sandbox/egress.py) and nothing else.

When bubblewrap cannot build that sandbox, nothing runs (fail closed): ``run_sandboxed``
raises ``SandboxUnavailable`` with the fix. ``sandbox.isolation: none`` runs repository code
directly on the host; it exists for machines where the operator accepts that, and it is
never chosen automatically.

``self_test`` tries to break out (read a canary file, another process's environment, write
outside, reach a Unix socket and a TCP port, leave a process behind) and reports each attempt;
``codeloop doctor`` prints it. See docs/architecture.md, "Trust boundaries".

The parts: ``command`` (the bubblewrap argv, the trampoline, the environment), ``run``
(probe, uid slots, running), ``trees`` (private copies), ``selftest`` (the escape attempts).
"""

from bot.sandbox.command import ENV_DIR, WORKSPACE
from bot.sandbox.run import SandboxResult, SandboxUnavailable, probe, run_sandboxed
from bot.sandbox.selftest import self_test
from bot.sandbox.trees import copy_tree, remove_tree

__all__ = [
    "ENV_DIR",
    "WORKSPACE",
    "SandboxResult",
    "SandboxUnavailable",
    "copy_tree",
    "probe",
    "remove_tree",
    "run_sandboxed",
    "self_test",
]

