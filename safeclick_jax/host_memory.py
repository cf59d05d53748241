"""Back large host allocations with transparent huge pages (Linux, glibc >= 2.35), so that an
XLA:CPU step does not page-fault its temporary buffers in 4 KB at a time on every call.

Why: XLA:CPU allocates each executable's temporary buffer afresh on every call (1.2 GB for the
SafeClick train step at 512 px, batch 8). glibc serves a block that large with a fresh mmap and
unmaps it on free, so every step faults the whole block back in, one 4 KB page at a time: 311,000
minor faults and 0.9-1.1 s of system time per step on a 2-core CPU, spent inside otherwise cheap
element-wise ops. With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` glibc asks the kernel for huge
pages for those blocks (madvise): ~820 faults and 0.2 s of system time per step, peak RSS
unchanged, and the memory still goes back to the kernel when freed (`benchmarks/bench_train.py`
with and without SAFECLICK_SYSTEM_MALLOC=1; benchmarks/RESULTS.md). Keeping freed memory in the
heap instead (mallopt) also stops the faults but lets the heap grow by a whole 1.2 GB generation
now and then.

The tunable is read when a process starts, so `use_huge_pages()` re-executes the running program
once with it set; call it first thing under `if __name__ == "__main__":` (train.py, evaluate.py,
`python -m safeclick_jax.segment` and the benchmarks do), never from code that a test or a library
user calls in-process. It does nothing when SAFECLICK_SYSTEM_MALLOC=1, when the tunable is already
set, on other systems or C libraries, or when transparent huge pages are off
(/sys/kernel/mm/transparent_hugepage/enabled = never).
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


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


def use_huge_pages() -> None:
    """Re-executes this program with GLIBC_TUNABLES += glibc.malloc.hugetlb=1 (see module doc)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (
        os.environ.get("SAFECLICK_SYSTEM_MALLOC", "") not in ("", "0")
        or TUNABLE in tunables
        or not huge_pages_available()
    ):
        return
    env = dict(os.environ, GLIBC_TUNABLES=f"{tunables}:{TUNABLE}" if tunables else TUNABLE)
    sys.stdout.flush()
    sys.stderr.flush()
    # orig_argv keeps `-m package.module` and interpreter options, which sys.argv drops.
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
