"""use_huge_pages(): the program re-executes itself once with glibc's huge-page malloc, and an
XLA:CPU call with large temporary buffers then stops faulting them in 4 KB at a time."""

import os
import subprocess
import sys

import pytest

from safeclick_jax.host_memory import TUNABLE, huge_pages_available, use_huge_pages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A program that calls use_huge_pages() as train.py does, then a jitted function whose
# temporaries (two [2048, 4096] fp32 = 64 MB) XLA allocates on every call; prints the tunables it
# ran with, how many times it started, and the minor page faults of the median call.
CHILD = r"""
import os, resource, sys
print("start", flush=True)
from safeclick_jax.host_memory import use_huge_pages
use_huge_pages()
import jax, jax.numpy as jnp
x = jnp.linspace(0.0, 1.0, 4096)
f = jax.jit(lambda x: jnp.sin(x[:2048, None] * x[None, :]).sum(0) @ jnp.cos(x[:, None] * x[None, :2048]))
for _ in range(3):
    f(x).block_until_ready()
faults = []
for _ in range(11):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print("tunables", os.environ.get("GLIBC_TUNABLES", "-"), "faults", sorted(faults)[5])
"""


def run_child(system_malloc: bool) -> tuple[str, int, float]:
    """(GLIBC_TUNABLES seen by the program, times it started, faults of the median call)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", SAFECLICK_SYSTEM_MALLOC="1" if system_malloc else "0")
    env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    words = out.stdout.split()
    return words[words.index("tunables") + 1], words.count("start"), float(words[words.index("faults") + 1])


@pytest.mark.skipif(not huge_pages_available(), reason="needs Linux, glibc >= 2.35 and transparent huge pages")
def test_use_huge_pages_reexecutes_once_and_cuts_page_faults():
    tunables, starts, huge = run_child(system_malloc=False)
    assert tunables == TUNABLE and starts == 2  # re-executed exactly once, with the tunable
    tunables, starts, system = run_child(system_malloc=True)
    assert tunables == "-" and starts == 1
    # 64 MB of temporaries = 16,384 pages of 4 KB per call under glibc's defaults (measured 16,389);
    # with 2 MB huge pages a few dozen.
    assert system > 4000, f"glibc defaults: {system:.0f} faults in the median call (expected ~16,000)"
    assert huge < system / 20, f"{huge:.0f} faults with huge pages vs {system:.0f} without"


def test_no_reexec_when_disabled_or_already_set(monkeypatch):
    # Would replace the pytest process if it re-executed: it must return.
    monkeypatch.setenv("SAFECLICK_SYSTEM_MALLOC", "1")
    use_huge_pages()
    monkeypatch.setenv("SAFECLICK_SYSTEM_MALLOC", "0")
    monkeypatch.setenv("GLIBC_TUNABLES", f"glibc.malloc.arena_max=2:{TUNABLE}")
    use_huge_pages()
