"""The host allocator of this project's programs: jemalloc that keeps freed blocks for reuse when
it is installed, else glibc with transparent huge pages (Linux).

Why: XLA:CPU allocates each executable's temporary buffer afresh on every call (gigabytes for
the training steps at 512 px). glibc serves a block that large with a fresh mmap and unmaps it on
free, so every call pays for mapping it again:
- in 4 KB pages, one minor fault each, paid in system time on every step
  (`glibc.malloc.hugetlb=1` maps them in 2 MB pages instead, one fault per huge page);
- on a virtual machine that reports free memory to its host (virtio-balloon free page reporting),
  memory left unmapped for more than a moment goes back to the host, and mapping it again costs
  the host's faults as well: when calls are seconds apart (steps alternating with other work)
  the step spends that time in the kernel, huge pages or not.
jemalloc with `MALLOC_CONF` below keeps freed blocks mapped and serves the next call's buffer from
them (no faults once warm), and returns memory left unused for about a minute
(dirty_decay_ms; oversize_threshold:0 puts the large blocks under that rule too instead of freeing
them at once). The process's resident set therefore stays at its peak while it works.
Measurements: benchmarks/RESULTS.md ("Host memory").

Both are read when a process starts, so `configure_allocator()` re-executes the running program
once with them set; call it first thing under `if __name__ == "__main__":` (train.py, evaluate.py,
demo.py, the app, `python -m safeclick_jax.segment` and the benchmarks do), never from code that a
test or a library user calls in-process. It does nothing when SAFECLICK_SYSTEM_MALLOC=1, when it
already ran (SAFECLICK_MALLOC is set), or where neither applies (other systems or C libraries, no
jemalloc and transparent huge pages off). jemalloc: Debian's libjemalloc2 (`make setup` installs it
when run as root).
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
JEMALLOC_CONF = "oversize_threshold:0,dirty_decay_ms:60000,muzzy_decay_ms:0"
MARKER = "SAFECLICK_MALLOC"  # set to "jemalloc" or "glibc-hugetlb" in the re-executed program


def huge_pages_available() -> bool:
    """True where glibc's hugetlb tunable exists and the kernel can give huge pages on madvise."""
    if platform.system() != "Linux":
        return False
    lib, version = platform.libc_ver()
    if lib != "glibc" or tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < (2, 35):
        return False
    try:
        with open(THP_MODE) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def jemalloc_library() -> str | None:
    """The installed jemalloc's shared library name (e.g. libjemalloc.so.2), or None."""
    if platform.system() != "Linux":
        return None
    return ctypes.util.find_library("jemalloc")


def allocator_env(environ: dict, jemalloc: bool = True) -> dict | None:
    """The environment to re-execute with, or None when nothing is to change (see module doc);
    jemalloc=False: glibc's huge-page malloc even where jemalloc is installed."""
    if environ.get("SAFECLICK_SYSTEM_MALLOC", "") not in ("", "0") or environ.get(MARKER):
        return None
    env = dict(environ)
    lib = jemalloc_library() if jemalloc else None
    if lib:
        env[MARKER] = "jemalloc"
        env["LD_PRELOAD"] = ":".join(p for p in (lib, environ.get("LD_PRELOAD", "")) if p)
        # Options given later win: a user's own MALLOC_CONF still applies.
        env["MALLOC_CONF"] = ",".join(p for p in (JEMALLOC_CONF, environ.get("MALLOC_CONF", "")) if p)
        return env
    tunables = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in tunables or not huge_pages_available():
        return None
    env[MARKER] = "glibc-hugetlb"
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return env


def glibc_env(environ: dict) -> dict:
    """environ with this module's jemalloc settings taken out and glibc's huge-page malloc in their
    place: for a child that should not run on jemalloc (the benchmarks' torch workers)."""
    base = {k: v for k, v in environ.items() if k not in (MARKER, "LD_PRELOAD", "MALLOC_CONF")}
    return allocator_env(base, jemalloc=False) or base


def configure_allocator(jemalloc: bool = True) -> None:
    """Re-executes this program with jemalloc, or glibc's huge-page malloc (see module doc);
    jemalloc=False: glibc's even where jemalloc is installed (benchmarks that run torch in-process)."""
    env = allocator_env(dict(os.environ), jemalloc)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # orig_argv keeps `-m package.module` and interpreter options, which sys.argv drops.
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
