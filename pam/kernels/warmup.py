"""First-run compilation of the CPU kernels in parallel processes.

Every CPU kernel is lazy and ``cache=True``: on a fresh install (or after an edit to a
definition file, see :mod:`pam.kernels._cache`) a training step compiles each kernel it
calls, one after the other, on one core: about 40 s of CPU for the default ``bdia-pam
train`` model (validation/README.md section 9c). :func:`warm` splits the kernels a training
step uses between this process and worker processes, one compiler per core, each writing
Numba's on-disk cache, and waits for them; the kernels the workers compiled are then
loaded from the cache on their first call, as in a second run. It pays off when cores are
free: on a machine whose cores are busy it can take longer than compiling lazily (measured
in ``validation/cold_start.py``).

What is compiled is :data:`MANIFEST` (``warm_manifest.json`` beside this file): the
outermost kernel compilations of recorded training steps ("workloads": the default
``bdia-pam train`` step and a small ``pam.convert`` GPT step), each as the dispatcher's
module and name, the Numba types of its arguments (its callees compile with it), its
recorded compile time and the workloads that used it. A kernel the manifest misses still
compiles lazily when first called; an entry a run never uses costs compile time only.
Regenerate it after changing kernel signatures with
``python validation/cold_start.py --record-manifest`` (tests/test_warmup.py checks that
every entry still names a kernel with that many arguments).

A marker file (:func:`pam.kernels.warm_worker.marker_path`: in ``NUMBA_CACHE_DIR`` or
beside the kernels' cache), named after the definitions digest and the entries, records a
finished warm-up, so later runs skip it (``warm`` returns at once).
Workers (:mod:`pam.kernels.warm_worker`) import :mod:`pam.kernels` without torch or the
rest of :mod:`pam`; a launcher may start them before it loads torch and hand them to
:func:`warm` (``bdia-pam``, see :mod:`bdia_pam._entry`).
"""
import json
import os
import time

from numba.core import event, types

from . import cpu, cpu_attn, cpu_conv, cpu_rows, cpu_xent, threads, warm_worker

MODULES = {"cpu": cpu, "cpu_attn": cpu_attn, "cpu_conv": cpu_conv, "cpu_rows": cpu_rows,
           "cpu_xent": cpu_xent, "threads": threads}
MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "warm_manifest.json")
PAM_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCALARS = {t.name: t for t in (types.boolean, types.int8, types.int16, types.int32,
                                types.int64, types.uint8, types.uint32, types.uint64,
                                types.float32, types.float64)}


# ----------------------------------------------------------------------------- types
def encode_type(t):
    """A JSON value for a Numba argument type: a scalar's name, ``["array", dtype, ndim,
    layout, readonly]``, or ``["tuple", [items]]`` (the arguments a
    :func:`pam.kernels.threads.splittable` kernel passes on to its body). Other types
    raise ValueError naming them."""
    if isinstance(t, types.Array) and t.dtype.name in _SCALARS and t.aligned:
        return ["array", t.dtype.name, t.ndim, t.layout, not t.mutable]
    if isinstance(t, types.BaseTuple) and not isinstance(t, types.BaseNamedTuple):
        return ["tuple", [encode_type(item) for item in t.types]]
    if getattr(t, "name", None) in _SCALARS and _SCALARS[t.name] == t:
        return t.name
    raise ValueError(f"kernel argument type {t!r} has no warm-up encoding")


def decode_type(value):
    """The Numba type :func:`encode_type` encoded."""
    if isinstance(value, str):
        return _SCALARS[value]
    if value[0] == "tuple":
        return types.Tuple([decode_type(item) for item in value[1]])
    kind, dtype, ndim, layout, readonly = value
    if kind != "array":
        raise ValueError(f"unknown encoded type {value!r}")
    return types.Array(_SCALARS[dtype], ndim, layout, readonly=readonly)


def _dispatcher_names():
    """{id(dispatcher): (module key, attribute name)} for the kernel modules' dispatchers."""
    names = {}
    for key, module in MODULES.items():
        for name, obj in vars(module).items():
            if hasattr(obj, "compile") and hasattr(obj, "py_func"):
                names.setdefault(id(obj), (key, name))
    return names


# ----------------------------------------------------------------------------- recording
class Recorder(event.Listener):
    """Records the outermost kernel compilations while installed (``with Recorder() as r``):
    ``r.entries`` is a list of {"module", "name", "args", "seconds"} for dispatchers of
    :data:`MODULES` compiled from Python (not as callees of another kernel); "seconds" is
    the process CPU time of the compilation with its callees (it does not grow with the
    load of the machine)."""

    def __init__(self):
        self.entries = []
        self._starts = []
        self._names = _dispatcher_names()

    def on_start(self, ev):
        self._starts.append(time.process_time())

    def on_end(self, ev):
        start = self._starts.pop()
        if self._starts:
            return                                  # a callee: compiled with its caller
        where = self._names.get(id(ev.data.get("dispatcher")))
        if where is None:
            return
        self.entries.append(dict(module=where[0], name=where[1],
                                 args=[encode_type(t) for t in ev.data["args"]],
                                 seconds=round(time.process_time() - start, 3)))

    def __enter__(self):
        event.register("numba:compile", self)
        return self

    def __exit__(self, *exc):
        event.unregister("numba:compile", self)


def merge_entries(recordings):
    """{workload name: entries} -> entries, each (module, name, args) once with the sorted
    list of the workloads that compiled it under "workloads", slowest first."""
    seen = {}
    for workload, entries in recordings.items():
        for e in entries:
            key = (e["module"], e["name"], json.dumps(e["args"]))
            kept = seen.setdefault(key, dict(e, workloads=[]))
            kept["seconds"] = max(kept["seconds"], e["seconds"])
            kept["workloads"] = sorted(set(kept["workloads"]) | {workload})
    return sorted(seen.values(), key=lambda e: -e["seconds"])


def load_manifest(path=MANIFEST, workload=None):
    """The manifest's entries; only those a ``workload`` compiled when it is given."""
    return warm_worker.manifest_entries(path, workload)


# ----------------------------------------------------------------------------- compiling
def compile_entries(entries):
    """Compile each manifest entry in this process (a no-op for signatures already
    compiled or loaded; entries naming a kernel that no longer exists are skipped)."""
    done = 0
    for e in entries:
        disp = getattr(MODULES[e["module"]], e["name"], None)
        if disp is None or not hasattr(disp, "compile"):
            continue
        disp.compile(tuple(decode_type(a) for a in e["args"]))
        done += 1
    return done


# Kernels of pam.kernels.cpu grouped by the scalar helpers they share (name fragment ->
# group); the other modules' kernels share within their module (cpu_rows: layer norm,
# cpu_xent: log_softmax and the cross-entropy terms).
_CPU_GROUPS = (("softmax", "softmax"), ("gelu", "gelu"), ("adamw", "optim"),
               ("sgd", "optim"), ("chunk_table", "optim"))


def code_group(entry):
    """The group of kernels ``entry`` shares most compiled helpers with.

    Numba compiles a helper once per process for every kernel there that calls it, so
    kernels of one group should compile in one process: split between two, both pay for
    the shared helpers (measured: 55 s of compile CPU in two processes against 39 s in
    one). The rest of pam.kernels.cpu (matmul, its range plans, the elementwise maps)
    forms one group; an entry without a module is a group of its own."""
    module, name = entry.get("module"), entry["name"]
    if module is None:
        return ("", name)
    if module != "cpu":
        return (module, "")
    for fragment, group in _CPU_GROUPS:
        if fragment in name:
            return (module, group)
    return (module, "matmul")


def partition(entries, bins):
    """Entries split into ``bins`` lists of about equal recorded compile time: whole
    :func:`code_group` groups, greedy, heaviest first (into the least loaded list; a group's
    entries keep their order, slowest first). With more lists than groups, entries are
    spread one by one instead (each list then pays its own shared helpers)."""
    groups = {}
    for e in sorted(entries, key=lambda e: -e["seconds"]):
        groups.setdefault(code_group(e), []).append(e)
    units = list(groups.values()) if len(groups) >= bins else [[e] for g in groups.values()
                                                                  for e in g]
    out = [[] for _ in range(bins)]
    load = [0.0] * bins
    for unit in sorted(units, key=lambda u: -sum(e["seconds"] for e in u)):
        i = load.index(min(load))
        out[i].extend(unit)
        load[i] += sum(e["seconds"] for e in unit)
    return out


def compile_part(manifest, workload, part, parts, force=False):
    """Compile list ``part`` of :func:`partition`'s ``parts`` lists of the manifest's
    entries for ``workload`` (what a worker does); nothing when the marker shows that this
    warm-up already ran, unless ``force``. Returns the number of entries compiled."""
    if not force and os.path.exists(warm_worker.marker_path(PAM_DIR, manifest, workload)):
        return 0
    return compile_entries(partition(load_manifest(manifest, workload), parts)[part])


def warm(processes=None, manifest=MANIFEST, force=False, announce=None, workload=None,
         workers=None):
    """Compile the manifest's kernels (those of ``workload`` when given, e.g.
    ``"bdia-pam train"``) into Numba's cache in ``processes`` parallel compilers (default:
    one per core available to this process): this process and ``processes - 1`` workers.
    ``workers``: a :class:`pam.kernels.warm_worker.Workers` already compiling every part
    of this manifest and workload (started by a launcher before it loaded torch): this
    process then compiles nothing itself and waits for them.

    Returns {"skipped": bool, "seconds": wall time, "processes": n compilers, "kernels":
    number of entries}. Skipped (at once) when a marker shows this warm-up already ran for
    these definitions, unless ``force``; ``announce(n)`` is called before waiting for the
    ``n`` compilers (e.g. to tell the user). A worker that fails raises RuntimeError with
    its error output; the kernels then still compile lazily on first call. An interrupt
    (Ctrl-C) kills the workers and leaves no marker; so does any error here.
    """
    t0 = time.perf_counter()
    entries = load_manifest(manifest, workload)
    marker = warm_worker.marker_path(PAM_DIR, manifest, workload)
    try:
        if os.path.exists(marker) and not force:
            return dict(skipped=True, seconds=time.perf_counter() - t0, processes=0,
                        kernels=len(entries))
        if workers is None:
            n = max(1, min(processes or warm_worker.cores(), len(entries)))
            own = partition(entries, n)[0]
            workers = warm_worker.spawn(PAM_DIR, manifest, workload, n, range(1, n), force)
        else:
            n, own = workers.parts, []
        if announce is not None:
            announce(n)
        compile_entries(own)
        errors = workers.wait()
    finally:
        if workers is not None:
            workers.kill()
    if errors:
        raise RuntimeError("kernel warm-up worker failed:\n" + "\n".join(errors))
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    with open(marker, "w") as fh:
        fh.write(f"{len(entries)} kernels compiled by {n} processes\n")
    return dict(skipped=False, seconds=time.perf_counter() - t0, processes=n,
                kernels=len(entries))
