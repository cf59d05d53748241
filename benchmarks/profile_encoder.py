"""Where SAM 2's image encoder spends its time, by operation: XLA:CPU's per-thunk trace (jax.profiler)
against torch.profiler, forward or forward + backward (the loss of bench_encoder_grad.py).

    python benchmarks/profile_encoder.py --case 128x8:grad [--which jax|torch|both] [--top 25]

JAX: every executed thunk (a fusion, a library call such as a YNNPACK dot fusion, a copy) is one
trace event named after its HLO instruction; the compiled HLO gives each instruction its
primitive and the Python line that made it (stack frames), and the events are summed by
(pass, model function, kind), pass = backward where the op comes from the transpose of the forward
(jax.grad). Ops inside a loop or branch body often carry no source line; they take the pass and
function of the while / call / conditional that runs them. Thunks that only run other thunks
(while loops of the chunked attention) are not counted twice. torch: torch.profiler's self CPU
time per aten op. Times are per call (the mean over --calls traced calls after one warm-up),
summed over threads. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench_encoder_grad import jax_fns, parse_case, torch_fns  # noqa: E402
from benchmarks.common import cpu_line  # noqa: E402
from convert.sam2_to_flax import convert_state_dict  # noqa: E402
from safeclick_jax.models.config import get_config  # noqa: E402

CONTAINERS = ("while", "call", "conditional")  # thunks whose time is their children's


def hlo_sources(hlo: str) -> dict:
    """instruction name -> (pass, function, kind) from the compiled HLO text."""
    sections = {}
    current = None
    for line in hlo.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = sections.setdefault(line, {})
            continue
        m = re.match(r"^(\d+) (.*)$", line) if current is not None else None
        if m:
            current[int(m.group(1))] = m.group(2)
        elif line.strip() and not line[0].isdigit():
            current = None
    files = {k: v.strip('"') for k, v in sections.get("FileNames", {}).items()}
    funcs = {k: v.strip('"') for k, v in sections.get("FunctionNames", {}).items()}
    locs = {}
    for k, v in sections.get("FileLocations", {}).items():
        f = dict(re.findall(r"(\w+)=(\w+)", v))
        locs[k] = (files[int(f["file_name_id"])], funcs[int(f["function_name_id"])], int(f["line"]))
    frames = {}
    for k, v in sections.get("StackFrames", {}).items():
        f = dict(re.findall(r"(\w+)=(\d+)", v))
        frames[k] = (int(f["file_location_id"]), int(f["parent_frame_id"]) - 1)  # printed 1-based, 0 = none

    def where(frame_id: int) -> str:
        while frame_id > 0:  # innermost frame in the project's model code
            loc, parent = frames[frame_id]
            path, func, line = locs[loc]
            if "safeclick_jax" in path:
                return f"{func}:{line}"
            frame_id = parent
        return "?"

    # Ops that XLA creates inside a loop or branch body (the chunked attention's pieces) carry no
    # metadata: they take the pass and function of the while / call / conditional that runs them.
    out, computation_of, caller = {}, {}, {}
    pat = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = .*? (\w[\w-]*)\(")
    computation = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            computation = head.group(1)
            continue
        m = pat.match(line)
        if not m:
            continue
        name, opcode = m.group(1), m.group(2)
        computation_of[name] = computation
        if opcode in CONTAINERS:
            called = re.findall(r"(?:condition|body|to_apply|true_computation|false_computation)=%?([\w.\-]+)", line)
            for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
                called += re.findall(r"%?([\w.\-]+)", group)
            for c in called:
                caller.setdefault(c, name)
        op_name = re.search(r'op_name="([^"]*)"', line)
        frame = re.search(r"stack_frame_id=(\d+)", line)
        op_name = op_name.group(1) if op_name else ""
        kind = "ynn dot fusion" if "__ynn_fusion" in line else op_name.rsplit("/", 1)[-1] or opcode
        if opcode == "fusion" and "__ynn_fusion" not in line:
            kind = f"{kind} (fusion)"
        direction = "backward" if "transpose(" in op_name else "forward" if op_name else None
        out[name] = (direction, where(int(frame.group(1))) if frame else "?", kind, opcode)

    def inherited(name: str, depth: int = 0) -> tuple:
        direction, func = out[name][:2]
        parent = caller.get(computation_of.get(name))
        if (direction is None or func == "?") and parent in out and depth < 50:
            up_direction, up_func = inherited(parent, depth + 1)
            return direction or up_direction, up_func if func == "?" else func
        return direction, func

    result = {}
    for name, (_, _, kind, opcode) in out.items():
        direction, func = inherited(name)
        result[name] = (direction or "forward", func, kind, opcode)
    return result


def profile_jax(fn, calls: int) -> tuple[list, float]:
    compiled = fn.compiled
    sources = hlo_sources(compiled.as_text())
    fn()
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        for _ in range(calls):
            fn()
        jax.profiler.stop_trace()
        (path,) = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    sums = collections.Counter()
    for e in events:
        src = sources.get(e.get("name")) if e.get("ph") == "X" else None
        if src and src[3] not in CONTAINERS:
            sums[src[:3]] += e["dur"] / 1e3 / calls
    return sums.most_common(), sum(sums.values())


def profile_torch(fn, calls: int) -> tuple[list, float]:
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    rows = [(e.key, e.self_cpu_time_total / 1e3 / calls) for e in prof.key_averages()]
    rows.sort(key=lambda r: -r[1])
    return rows, sum(r[1] for r in rows)


def print_jax(rows: list, total: float, top: int, unit: str, group_name: str, group) -> None:
    """profile_jax's rows as markdown: the top ops, then their times summed by group(where, kind)."""
    print(f"JAX: thunk time {total:.0f} ms per {unit} (summed over threads)\n")
    print("| pass | function:line | kind | ms | share |\n|---|---|---|---:|---:|")
    for (direction, where, k), ms in rows[:top]:
        print(f"| {direction} | {where} | {k} | {ms:.1f} | {ms / total:.1%} |")
    by = collections.Counter()
    for (direction, where, k), ms in rows:
        by[(direction, group(where, k))] += ms
    print(f"\n| pass | {group_name} | ms | share |\n|---|---|---:|---:|")
    for (direction, g), ms in by.most_common(top):
        print(f"| {direction} | {g} | {ms:.1f} | {ms / total:.1%} |")


def print_torch(rows: list, total: float, top: int, unit: str) -> None:
    print(f"\ntorch: self CPU time {total:.0f} ms per {unit}\n")
    print("| aten op | ms | share |\n|---|---:|---:|")
    for name, ms in rows[:top]:
        print(f"| {name} | {ms:.1f} | {ms / total:.1%} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sam2.1_hiera_t")
    p.add_argument("--case", default="128x8:grad")
    p.add_argument("--which", choices=("jax", "torch", "both"), default="both")
    p.add_argument("--calls", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    size, batch, kind = parse_case(a.case)
    from sam2.build_sam import build_sam2

    version = a.model.split("_hiera_")[0]
    torch.manual_seed(0)
    tmodel = build_sam2(f"configs/{version}/{a.model}.yaml", ckpt_path=None, device="cpu")
    print(f"{a.case}, {cpu_line()}, jax {jax.__version__}, torch {torch.__version__}\n")
    if a.which in ("jax", "both"):
        jmodel, _ = convert_state_dict({k: v.numpy() for k, v in tmodel.state_dict().items()}, get_config(a.model))
        rows, total = profile_jax(jax_fns(jmodel, size, batch)[kind == "grad"], a.calls)
        print_jax(rows, total, a.top, "call", "kind", lambda where, kind: "dot" if "dot" in kind else kind)
    if a.which in ("torch", "both"):
        rows, total = profile_torch(torch_fns(tmodel, size, batch)[kind == "grad"], a.calls)
        print_torch(rows, total, a.top, "call")


if __name__ == "__main__":
    from safeclick_jax.host_memory import configure_allocator

    configure_allocator(jemalloc=False)  # torch in this process too: glibc's huge-page malloc (host_memory.py)
    main()
