"""The worker processes of the kernel warm-up (:mod:`pam.kernels.warmup`), without torch.

This module imports only the standard library, so a launcher that must not load torch yet
can load it by file path and start the workers first: the ``bdia-pam`` command
(:mod:`bdia_pam._entry`) starts them before it imports torch and pam, and the kernels
compile while it loads. :func:`spawn` starts them; run as a script this file is one
worker::

    python warm_worker.py PAM_DIR MANIFEST WORKLOAD PART PARTS FORCE

It makes ``pam`` an empty package rooted at PAM_DIR (pam/__init__, which imports torch,
does not run), then compiles part PART of the manifest's split into PARTS lists
(:func:`pam.kernels.warmup.compile_part`; WORKLOAD "" means every entry, FORCE "1" ignores
the marker of a finished warm-up). Its exit status is 0 on success, its error on stderr.
"""
import os
import subprocess
import sys
import types


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


def spawn(pam_dir, manifest, workload, parts, indices, force=False):
    """Start one worker per part index in ``indices`` of the ``parts``-way split of the
    manifest's entries for ``workload`` (None: all); returns :class:`Workers`."""
    procs = []
    try:
        for i in indices:
            procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), pam_dir, manifest, workload or "",
                 str(i), str(parts), "1" if force else "0"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                text=True))
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
