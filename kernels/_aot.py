"""Ahead-of-time GPU compile of the kernels the ops launch, on a machine without a GPU.

Two steps, in two processes (the interpreter replaces @triton.jit functions, so recording
and compiling cannot share one):

    TRITON_INTERPRET=1 python -m kernels._aot record specs.json   # run each op's examples
    python -m kernels._aot compile specs.json report.json          # sm_80 + sm_90 cubins

``record`` calls every op module's ``_compile_examples()`` and writes the specializations
that :func:`kernels._launch.launch` saw (plus any passed in). ``compile`` expands each over
its kernel's registered tuning table, compiles with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` and reads registers, spills (local memory) and shared
memory from the cubin with the ``cuobjdump`` that ships in the triton wheel.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ARCHS = (80, 90)
_CONTROL = ("num_warps", "num_stages")

# H100 (sm_90) per-SM limits for theoretical occupancy
SM90 = {"regs": 65536, "threads": 2048, "warps": 64, "blocks": 32,
        "smem": 228 * 1024, "smem_per_block_reserved": 1024, "reg_alloc_unit": 256}


def op_modules() -> list[str]:
    import kernels.ops
    return [f"kernels.ops.{m.name}" for m in pkgutil.iter_modules(kernels.ops.__path__)]


def launched_kernels() -> set[str]:
    """Every top-level ``*_kernel`` jit function in the op modules (helpers excluded)."""
    found = set()
    for name in op_modules():
        mod = importlib.import_module(name)
        for attr, obj in vars(mod).items():
            fn = getattr(obj, "fn", None)
            if attr.endswith("_kernel") and fn is not None and fn.__module__ == name:
                found.add(f"{name}:{attr}")
    return found


def run_examples(device: str = "cpu", modules: list[str] | None = None) -> None:
    """Call each op module's ``_compile_examples(device)`` (all op modules by default)."""
    for name in modules or op_modules():
        examples = getattr(importlib.import_module(name), "_compile_examples", None)
        if examples is not None:
            examples(device)


def expand(launched: list[dict], extra: list[dict] | None = None) -> list[dict]:
    """Recorded specializations (``Specialization.as_json()``), each expanded over every row
    of its kernel's tuning table, not only the row its launch picked."""
    from kernels import _launch
    specs = {json.dumps(d, sort_keys=True): d for d in list(launched) + list(extra or [])}
    tables = _launch.TUNING_TABLES
    out, seen = [], set()
    for d in specs.values():
        for row in tables.get(d["kernel"], [dict(d["tunables"])]):
            e = dict(d, tunables=sorted([list(kv) for kv in row.items()]),
                     interpreter_only=row in _launch.INTERPRETER_ROWS.get(d["kernel"], []))
            key = json.dumps(e, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(e)
    return out


def record(extra: list[dict] | None = None, modules: list[str] | None = None) -> list[dict]:
    """Run the op modules' ``_compile_examples()`` (all by default); return the recorded
    specializations."""
    from kernels import _launch, _utils
    if not _utils.INTERPRET:
        raise RuntimeError("recording runs the ops on CPU tensors: set TRITON_INTERPRET=1")
    run_examples(modules=modules)
    return expand([s.as_json() for s in _launch.LAUNCHES], extra)


def record_in_subprocess(extra: list[dict] | None = None) -> list[dict]:
    """Record in fresh interpreter processes, one per op module, as many at a time as there
    are CPUs (the interpreter is single-threaded; one module's examples take up to a minute)."""
    from concurrent.futures import ThreadPoolExecutor
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "extra.json")
        src.write_text(json.dumps(extra or []))
        env = dict(os.environ, TRITON_INTERPRET="1")

        def one(module: str) -> list[dict]:
            dst = Path(tmp, f"{module}.json")
            subprocess.run([sys.executable, "-m", "kernels._aot", "record", str(dst),
                            "--extra", str(src), "--modules", module], env=env, check=True)
            return json.loads(dst.read_text())

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            parts = list(pool.map(one, op_modules()))
    merged = {json.dumps(d, sort_keys=True): d for part in parts for d in part}
    return list(merged.values())


def _cuobjdump() -> Path:
    import triton
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


# global/generic/shared atomics and reductions (ATOMG, REDG, ATOM, ATOMS, ...), not the
# warp-level REDUX
_SASS_ATOMIC = re.compile(r"(?:ATOM|RED)[GS]?")
_SASS_OPCODE = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", re.M)


# The PTX instructions ptxas can lower to a global atomic or a memory fence: atomics and
# reductions, explicit fences, and memory operations with acquire/release/sc semantics.
_PTX_ORDERING = re.compile(r"\b(?:atom|red|membar|fence)\.|\.(?:acquire|release|acq_rel|sc)\b")


def resource_usage(cubin: bytes, ptx: str | None = None) -> dict:
    """Registers, stack, static shared memory and spills from the cubin's resource usage;
    from its SASS, the global atomics/reductions and the memory fences (``MEMBAR``): a
    ``tl.atomic_add`` with Triton's default ``acq_rel`` compiles to ``MEMBAR`` + ``ATOMG``,
    with ``sem="relaxed"`` to a fence-free ``REDG``.

    Disassembling is most of a compile's cost (0.37 s of about 0.6 s), so given the PTX a
    kernel with none of the instructions that lower to an atomic or a fence
    (``_PTX_ORDERING``) is counted as having none without it; every other kernel's SASS is
    read."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        read_sass = ptx is None or _PTX_ORDERING.search(ptx) is not None
        flags = ["--dump-resource-usage"] + (["--dump-sass"] if read_sass else [])
        text = subprocess.run([str(_cuobjdump()), *flags, f.name], capture_output=True,
                              text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not m:
        raise RuntimeError(f"cannot read cuobjdump output:\n{text}")
    reg, stack, shared, local = map(int, m.groups())
    opcodes = [op.split(".")[0] for op in _SASS_OPCODE.findall(text)]
    return {"registers": reg, "stack": stack, "static_shared": shared, "spill_bytes": local,
            "atomics": sum(_SASS_ATOMIC.fullmatch(op) is not None for op in opcodes),
            "fences": opcodes.count("MEMBAR"), "sass_read": read_sass}


_LAYOUT = re.compile(r"^#(\w+) = #ttg\.blocked<\{(.*)\}>", re.M)
_MEMORY_OP = re.compile(r"\b(tt\.load|tt\.store|tt\.atomic_rmw)\b.*?"
                        r"tensor<([0-9x]+)x!tt\.ptr<[^>]*>, #(\w+)>")


def _blocked(fields: str) -> dict:
    """``sizePerThread = [1, 2], threadsPerWarp = [4, 8], ...`` -> {name: [ints]}."""
    return {k: [int(v) for v in vals.split(",")]
            for k, vals in re.findall(r"(\w+) = \[([0-9, ]+)\]", fields)}


def memory_ops(ttgir: str) -> list[dict]:
    """Every 1-D and 2-D global load, store and atomic in a loop body of the TTGIR, with
    where a warp's lanes run: ``shape`` (the tile), ``lanes`` (threadsPerWarp per tile axis)
    and ``per_thread`` (sizePerThread), read from the op's ``#blocked`` layout (None when
    the compiler gave it another layout). Accesses outside loops run once per program and
    are not listed."""
    layouts = {name: _blocked(fields) for name, fields in _LAYOUT.findall(ttgir)}
    ops, stack = [], []
    for line in ttgir.splitlines():
        text = line.strip()
        if text.startswith("}"):
            if stack:
                stack.pop()
        m = _MEMORY_OP.search(text)
        if m and "for" in stack:
            shape = [int(d) for d in m.group(2).split("x")]
            layout = layouts.get(m.group(3))
            if len(shape) in (1, 2):
                ops.append({"op": m.group(1).split(".")[1], "shape": shape,
                            "lanes": layout and layout["threadsPerWarp"],
                            "per_thread": layout and layout["sizePerThread"]})
        if text.endswith("{") and not text.startswith("}"):
            stack.append("for" if "scf.for" in text or "scf.while" in text else "block")
        elif text.startswith("}") and text.endswith("{"):
            stack.append("block")   # } else {
    return ops


def lane_rows(results: list[dict]) -> list[dict]:
    """For each sm_90 specialization with accesses in a loop: per input layout and access,
    the lanes (x elements per thread) a warp puts along the tensor's stride-1 tile axis,
    against what the tile allows (its extent there, at most 32). ``ok`` when the compiler
    gave that axis all it could; ``note`` where the kernel says why not.

    A rule's axis is an int for 2-D tiles, or ``("flat", inner)`` for a flat vector whose
    fast index walks the stride-1 dimension ``inner`` elements at a time (a warp covers
    lanes x elements per thread consecutive entries, of which at most ``inner`` run along
    it). 1-D accesses are checked where the rule names them flat; a 2-D access against a
    flat rule (or none) fails."""
    from kernels import _launch
    for name in op_modules():
        importlib.import_module(name)   # tables and lane rules register on import
    rows = []
    for r in results:
        if not r["ok"] or r["arch"] != 90 or not r.get("memory_ops"):
            continue
        spec = r["spec"]
        kid = spec["kernel"]
        rule = _launch.LANE_RULES.get(kid)
        base = {"kernel": kid.split(":")[1], "spec": describe(spec),
                "runs_on": "interpreter" if spec.get("interpreter_only") else "GPU"}
        if rule is None:
            rows.append(dict(base, layout="-", access="-", tile="-", lanes="-", along=0,
                             needed=1, ok=False, note="no lane rule declared"))
            continue
        values = {**dict(spec["constexprs"]), **dict(spec["tunables"])}
        for layout, axes in rule(values).items():
            for op in r["memory_ops"]:
                axis = axes.get(op["op"])
                shape = op["shape"]
                lanes = op["lanes"]
                flat = isinstance(axis, tuple)
                if len(shape) == 1 and not flat:
                    continue   # a 1-D access the rule does not name: not a tile gather
                if axis is None or lanes is None or flat != (len(shape) == 1):
                    along, needed = 0, 1
                elif flat:
                    inner = axis[1]
                    along = min(lanes[0] * op["per_thread"][0], inner)
                    needed = min(32, inner, shape[0])
                else:
                    along = lanes[axis] * op["per_thread"][axis]
                    needed = min(32, shape[axis])
                rows.append(dict(base, layout=layout, access=op["op"],
                                 tile="x".join(map(str, shape)),
                                 lanes="x".join(map(str, lanes or [])), along=along,
                                 needed=needed, ok=along >= needed,
                                 note=_launch.LANE_NOTES.get(kid, {}).get(layout)))
    return rows


def occupancy_sm90(registers: int, num_warps: int, shared_bytes: int) -> float:
    """Theoretical occupancy (resident warps / 64) of one kernel on an H100 SM."""
    unit = SM90["reg_alloc_unit"]
    regs_per_warp = -(-max(registers, 1) * 32 // unit) * unit
    blocks_by_regs = (SM90["regs"] // regs_per_warp) // num_warps
    blocks_by_threads = SM90["threads"] // (num_warps * 32)
    per_block_smem = shared_bytes + SM90["smem_per_block_reserved"]
    blocks_by_smem = SM90["smem"] // per_block_smem
    blocks = min(blocks_by_regs, blocks_by_threads, blocks_by_smem, SM90["blocks"])
    return blocks * num_warps / SM90["warps"]


def compile_one(job: tuple[dict, int], full_sass: bool = False) -> dict:
    """Compile one specialization for one arch; never raises (errors are reported).
    ``full_sass``: disassemble it even where its PTX rules out atomics and fences."""
    spec, arch = job
    result = {"spec": spec, "arch": arch}
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        module, name = spec["kernel"].split(":")
        fn = getattr(importlib.import_module(module), name)
        tunables = dict(spec["tunables"])
        options = {k: tunables.pop(k) for k in _CONTROL if k in tunables}
        constexprs = dict(spec["constexprs"], **tunables)
        signature = dict(spec["signature"])
        signature.update({k: "constexpr" for k in constexprs})
        ordered = {a: signature[a] for a in fn.arg_names if a in signature}
        # the alignment the JIT saw at launch (pointers and ints divisible by 16)
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]]
                 for a in spec.get("divisible", ())}
        compiled = triton.compile(ASTSource(fn, ordered, constexprs, attrs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
        usage = resource_usage(compiled.asm["cubin"], None if full_sass else compiled.asm["ptx"])
        usage["memory_ops"] = memory_ops(compiled.asm["ttgir"])
        shared = max(int(compiled.metadata.shared), usage["static_shared"])
        result.update(usage, ok=True, num_warps=compiled.metadata.num_warps,
                      shared_bytes=shared,
                      occupancy_sm90=occupancy_sm90(usage["registers"],
                                                    compiled.metadata.num_warps, shared))
    except Exception as e:  # reported per specialization, so one failure names itself
        result.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
    return result


def compile_all(specs: list[dict], archs=ARCHS, jobs: int | None = None) -> list[dict]:
    work = [(s, a) for s in specs for a in archs]
    jobs = jobs or min(len(work), os.cpu_count() or 1) or 1
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(compile_one, work))


def compile_in_subprocess(specs: list[dict], archs=ARCHS) -> list[dict]:
    """Compile in a fresh process without TRITON_INTERPRET (real JIT functions)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "specs.json"), Path(tmp, "report.json")
        src.write_text(json.dumps(specs))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        subprocess.run([sys.executable, "-m", "kernels._aot", "compile", str(src), str(dst),
                        "--arch", *map(str, archs)], env=env, check=True)
        return json.loads(dst.read_text())


def can_compile_without_gpu() -> str | None:
    """None when this Triton can compile for sm_90 here; otherwise the reason it cannot."""
    code = ("import triton, triton.language as tl\n"
            "from triton.compiler import ASTSource\n"
            "from triton.backends.compiler import GPUTarget\n"
            "@triton.jit\n"
            "def k(x, B: tl.constexpr):\n"
            "    tl.store(x + tl.arange(0, B), tl.arange(0, B).to(tl.float32))\n"
            "c = triton.compile(ASTSource(k, {'x': '*fp32', 'B': 'constexpr'}, {'B': 32}),"
            " target=GPUTarget('cuda', 90, 32))\n"
            "assert c.asm['cubin']\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(code)
    try:
        p = subprocess.run([sys.executable, f.name], env=env, capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if p.returncode:
        return "this Triton cannot compile for sm_90 without a device: " + p.stderr[-500:]
    if not _cuobjdump().exists():
        return f"cuobjdump not shipped with this Triton (looked at {_cuobjdump()})"
    return None


INTERPRETER_ONLY = "interpreter only: no GPU runs this row"
UNJUSTIFIED = "BELOW TARGET, NOT JUSTIFIED"


def occupancy_notes() -> dict[str, str]:
    """kernel id -> why its sm_90 occupancy below the target is the right trade."""
    from kernels import _launch
    for name in op_modules():
        importlib.import_module(name)  # registering a tuning table registers its note
    return dict(_launch.OCCUPANCY_NOTES)


def occupancy_note(spec: dict, occupancy: float | None, notes: dict[str, str]) -> str | None:
    """Why a row is exempt from, or sits below, the sm_90 occupancy target: INTERPRETER_ONLY,
    the kernel's note, UNJUSTIFIED; None when it meets the target (or is not sm_90)."""
    from kernels import _launch
    if spec.get("interpreter_only"):
        return INTERPRETER_ONLY
    if occupancy is None or occupancy >= _launch.OCCUPANCY_TARGET:
        return None
    return notes.get(spec["kernel"], UNJUSTIFIED)


def below_occupancy_target(results: list[dict]) -> list[dict]:
    """sm_90 results of rows a GPU runs whose occupancy is under the target, with no note."""
    notes = occupancy_notes()
    return [r for r in results if r["ok"] and r["arch"] == 90
            and occupancy_note(r["spec"], r["occupancy_sm90"], notes) == UNJUSTIFIED]


def describe(spec: dict) -> str:
    """A short, readable name of a specialization: dtypes of pointers, constexprs, tuning."""
    ptrs = [t for _, t in spec["signature"] if t.startswith("*")]
    parts = [f"{k}={v}" for k, v in spec["constexprs"]] + [f"{k}={v}" for k, v in
                                                          spec["tunables"]]
    return f"{'/'.join(dict.fromkeys(p[1:] for p in ptrs))} " + " ".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("out")
    r.add_argument("--extra", help="JSON list of specializations to add")
    r.add_argument("--modules", nargs="+", default=None, help="op modules (default: all)")
    c = sub.add_parser("compile")
    c.add_argument("specs")
    c.add_argument("out")
    c.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    c.add_argument("--jobs", type=int, default=None)
    a = p.parse_args(argv)
    if a.cmd == "record":
        extra = json.loads(Path(a.extra).read_text()) if a.extra else []
        Path(a.out).write_text(json.dumps(record(extra, a.modules)))
    else:
        results = compile_all(json.loads(Path(a.specs).read_text()), a.arch, a.jobs)
        Path(a.out).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
