"""The kernel warm-up's part without torch or Numba (:mod:`pam.kernels.warmup`): the
definitions digest, the marker of a finished warm-up, and the worker processes.

This module imports only the standard library, so a launcher that must not load torch yet
can load it by file path, see whether the warm-up already ran (:func:`marker_path`) and
start the workers first: the ``bdia-pam`` command (:mod:`bdia_pam._entry`) starts them
before it imports torch and pam, and the kernels compile while it loads. :func:`spawn`
starts them; run as a script this file is one worker::

    python warm_worker.py PAM_DIR MANIFEST WORKLOAD PART PARTS FORCE

It makes ``pam`` an empty package rooted at PAM_DIR (pam/__init__, which imports torch,
does not run), then compiles part PART of the manifest's split into PARTS lists
(:func:`pam.kernels.warmup.compile_part`; WORKLOAD "" means every entry, FORCE "1" ignores
the marker of a finished warm-up). Its exit status is 0 on success, its error on stderr.
"""
import functools
import hashlib
import json
import os
import subprocess
import sys
import types

# The files whose code the cached CPU kernels compile (pam.kernels._cache stamps the
# kernels with their digest): the scalar definitions, the vec8 intrinsics and the kernel
# files themselves (cpu_conv compiles helpers of cpu, cpu_xent kernels of cpu_rows).
KERNEL_FILES = (("kernels", "cpu.py"), ("kernels", "cpu_conv.py"), ("kernels", "cpu_rows.py"),
                ("kernels", "cpu_xent.py"), ("kernels", "cpu_attn.py"),
                ("kernels", "threads.py"))
DEFINITION_FILES = (("bits.py",), ("optim_bits.py",), ("rows_bits.py",), ("xent_bits.py",),
                    ("attn_bits.py",), ("kernels", "vec8.py"),
                    ("kernels", "atomics.py")) + KERNEL_FILES


def definitions_digest(pam_dir):
    """SHA-256 over the contents of the :data:`DEFINITION_FILES` of the pam package in
    ``pam_dir``, re-read when a file's modification time or size changes (a file edited
    while a process runs changes the stamp of the kernels that process caches afterwards)."""
    stats = []
    for parts in DEFINITION_FILES:
        path = os.path.join(pam_dir, *parts)
        st = os.stat(path)
        stats.append((path, st.st_mtime_ns, st.st_size))
    return _digest(tuple(stats))


@functools.lru_cache(maxsize=8)
def _digest(stats):
    h = hashlib.sha256()
    for path, _, _ in stats:
        with open(path, "rb") as fh:
            h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()


def manifest_entries(manifest, workload=None):
    """The entries of the warm-up manifest file; only those a ``workload`` compiled when it
    is given."""
    with open(manifest) as fh:
        entries = json.load(fh)["kernels"]
    if workload is None:
        return entries
    return [e for e in entries if workload in e.get("workloads", ())]


def _marker_dir(pam_dir):
    """Where warm-up markers live: ``NUMBA_CACHE_DIR`` when set (Numba caches the kernels
    there), else pam's kernel folder's ``__pycache__`` when that folder is writable (where
    Numba caches them then), else ``$XDG_CACHE_HOME/pam`` (default ``~/.cache/pam``)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return os.environ["NUMBA_CACHE_DIR"]
    kernels = os.path.join(pam_dir, "kernels")
    if os.access(kernels, os.W_OK):
        return os.path.join(kernels, "__pycache__")
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(home, "pam")


def marker_path(pam_dir, manifest, workload=None):
    """The marker file of a finished warm-up of ``manifest``'s entries for ``workload`` with
    the pam package in ``pam_dir``: named after the definitions digest, those entries and
    the Python version, so an edit to a definition or a new manifest runs it again."""
    h = hashlib.sha256(definitions_digest(pam_dir).encode())
    h.update(json.dumps(manifest_entries(manifest, workload), sort_keys=True).encode())
    h.update(sys.version.encode())
    return os.path.join(_marker_dir(pam_dir), f"pam-warm-{h.hexdigest()[:24]}")


def cores():
    """The number of cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                          # not on Linux
        return os.cpu_count() or 1


class Workers:
    """Running warm-up workers: :meth:`wait` for them, :meth:`kill` what still runs."""

    def __init__(self, procs, parts):
        self.procs = procs
        self.parts = parts                          # the split the workers compile parts of

    def wait(self):
        """Wait for every worker; the error output (last 2000 characters) of each one that
        failed, in start order (an empty list when all succeeded)."""
        errors = []
        for proc in self.procs:
            err = proc.stderr.read()
            if proc.wait() != 0:
                errors.append(err[-2000:])
        return errors

    def kill(self):
        """Kill the workers still running (a no-op for finished ones)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()


def worker_environ():
    """The environment of a compiler process (a worker, or validation/cold_start.py's
    timing process): this one's, with Numba's error-message highlighting off. Numba's type
    inference raises and formats thousands of internal errors while it compiles (each
    lookup that tries a value it cannot type); with highlighting on (the default whenever
    colorama is installed, even with its colourless default scheme) each message goes
    through colorama's terminal wrappers: about 2 % of the compile CPU. The messages read
    the same without it."""
    return dict(os.environ, NUMBA_DISABLE_ERROR_MESSAGE_HIGHLIGHTING="1")


def spawn(pam_dir, manifest, workload, parts, indices, force=False):
    """Start one worker per part index in ``indices`` of the ``parts``-way split of the
    manifest's entries for ``workload`` (None: all) in :func:`worker_environ`; returns
    :class:`Workers`."""
    procs = []
    env = worker_environ()
    try:
        for i in indices:
            procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), pam_dir, manifest, workload or "",
                 str(i), str(parts), "1" if force else "0"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                text=True, env=env))
    except BaseException:
        Workers(procs, parts).kill()
        raise
    return Workers(procs, parts)


def main(argv):
    pam_dir, manifest, workload, part, parts, force = argv[1:7]
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    pkg = types.ModuleType("pam")
    pkg.__path__ = [pam_dir]
    sys.modules["pam"] = pkg
    from pam.kernels import warmup
    warmup.compile_part(manifest, workload or None, int(part), int(parts), force == "1")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
