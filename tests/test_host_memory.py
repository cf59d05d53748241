"""configure_allocator(): the program re-executes itself once with jemalloc (or, without it, glibc's
huge-page malloc), and an XLA:CPU call with large temporary buffers then stops faulting them in."""

import os
import subprocess
import sys

import pytest

from safeclick_jax import host_memory
from safeclick_jax.host_memory import (
    JEMALLOC_CONF,
    MARKER,
    TUNABLE,
    allocator_env,
    configure_allocator,
    huge_pages_available,
    jemalloc_library,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A program that calls configure_allocator() as train.py does, then a jitted function whose
# temporaries (two [2048, 4096] fp32 arrays) XLA allocates on every call; prints the allocator it
# ran with, whether jemalloc is mapped, how many times it started, and the minor page faults of
# the median call.
CHILD = r"""
import os, resource, sys
print("start", flush=True)
from safeclick_jax.host_memory import configure_allocator
configure_allocator()
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
with open("/proc/self/maps") as m:
    mapped = "jemalloc" in m.read()
print("allocator", os.environ.get("SAFECLICK_MALLOC", "-"), "jemalloc_mapped", mapped, "faults", sorted(faults)[5])
"""


def run_child(env: dict) -> tuple[str, bool, int, float]:
    """(allocator marker, jemalloc mapped, times started, faults of the median call)."""
    env = dict(env, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    words = out.stdout.split()
    value = lambda key: words[words.index(key) + 1]  # noqa: E731
    return value("allocator"), value("jemalloc_mapped") == "True", words.count("start"), float(value("faults"))


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (MARKER, "GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def system_faults() -> float:
    marker, mapped, starts, faults = run_child(clean_env(SAFECLICK_SYSTEM_MALLOC="1"))
    assert (marker, mapped, starts) == ("-", False, 1)
    # glibc's defaults map the temporaries anew in 4 KB pages: 2 x 2048 x 4096 x 4 B / 4 KB per call.
    assert faults > 4000, f"glibc defaults: {faults:.0f} faults in the median call (expected ~16,000)"
    return faults


@pytest.mark.skipif(jemalloc_library() is None, reason="needs jemalloc (Debian: libjemalloc2)")
def test_reexecutes_once_with_jemalloc_and_reuses_buffers(system_faults):
    marker, mapped, starts, faults = run_child(clean_env(SAFECLICK_SYSTEM_MALLOC="0"))
    assert (marker, mapped, starts) == ("jemalloc", True, 2)  # re-executed exactly once, jemalloc loaded
    # Freed blocks stay mapped and the next call's buffers come from them: no faults once warm.
    assert faults < system_faults / 100, f"{faults:.0f} faults with jemalloc vs {system_faults:.0f} without"


@pytest.mark.skipif(not huge_pages_available(), reason="needs Linux, glibc >= 2.35 and transparent huge pages")
def test_without_jemalloc_glibc_huge_pages_cut_page_faults(system_faults, monkeypatch):
    monkeypatch.setattr(host_memory, "jemalloc_library", lambda: None)
    env = allocator_env(clean_env(SAFECLICK_SYSTEM_MALLOC="0"))
    assert env[MARKER] == "glibc-hugetlb" and env["GLIBC_TUNABLES"] == TUNABLE and "LD_PRELOAD" not in env
    marker, mapped, starts, faults = run_child(env)  # as re-executed: the marker stops a second exec
    assert (marker, mapped, starts) == ("glibc-hugetlb", False, 1)
    # 2 MB pages: one fault per huge page instead of one per 4 KB page.
    assert faults < system_faults / 20, f"{faults:.0f} faults with huge pages vs {system_faults:.0f} without"


def test_user_settings_are_kept(monkeypatch):
    monkeypatch.setattr(host_memory, "jemalloc_library", lambda: "libjemalloc.so.2")
    env = allocator_env({"LD_PRELOAD": "libfoo.so", "MALLOC_CONF": "narenas:2"})
    assert env["LD_PRELOAD"] == "libjemalloc.so.2:libfoo.so"
    assert env["MALLOC_CONF"] == f"{JEMALLOC_CONF},narenas:2"  # jemalloc: a later option wins
    monkeypatch.setattr(host_memory, "jemalloc_library", lambda: None)
    monkeypatch.setattr(host_memory, "huge_pages_available", lambda: True)
    env = allocator_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}"


def test_no_reexec_when_disabled_or_already_done(monkeypatch):
    assert allocator_env({"SAFECLICK_SYSTEM_MALLOC": "1"}) is None
    assert allocator_env({MARKER: "jemalloc"}) is None
    monkeypatch.setattr(host_memory, "jemalloc_library", lambda: None)
    assert allocator_env({"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}"}) is None
    # Would replace the pytest process if it re-executed: it must return.
    monkeypatch.setenv("SAFECLICK_SYSTEM_MALLOC", "1")
    configure_allocator()
