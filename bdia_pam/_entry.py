"""The ``bdia-pam`` command: starts the kernel warm-up before torch loads, then runs
:func:`bdia_pam.cli.main`.

On a fresh install the first ``bdia-pam train`` compiles the PAM CPU kernels
(:mod:`pam.kernels.warmup`). Loading torch, pam and the data takes the command a few
seconds of one core, so the compiler processes start first, from here, with the standard
library only (:mod:`pam.kernels.warm_worker` is loaded by file path, pam itself is not
imported), and compile while the command loads; the training waits for them before its
first step. Later runs find the warm-up's marker and start no worker. The workers start
for ``train`` unless its arguments say the kernels are not needed (``--arithmetic float``,
``--device cuda``, ``--help``), the environment sets ``PAM_WARMUP=0`` or the launch is
distributed (``WORLD_SIZE`` > 1), as :func:`bdia_pam.cli.cmd_train` decides for the
warm-up itself; a ``--resume`` whose checkpoint trains in float stops them unused.
Ctrl-C, an error, or a run that does not wait for them kills them; an interrupted warm-up
leaves no marker.
"""
import importlib.util
import os
import sys

WORKLOAD = "bdia-pam train"


def _option(argv, name):
    """The value of ``--name VALUE`` / ``--name=VALUE`` in argv (the last one), or None."""
    value = None
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(name + "="):
            value = a[len(name) + 1:]
    return value


def wants_warmup(argv, environ=None):
    """True when ``bdia-pam`` arguments ``argv`` will run the CPU kernel warm-up (as far as
    the arguments tell before they are parsed)."""
    environ = os.environ if environ is None else environ
    if not argv or argv[0] != "train" or {"-h", "--help"} & set(argv):
        return False
    if environ.get("PAM_WARMUP", "1") == "0":
        return False
    try:
        if int(environ.get("WORLD_SIZE", "1")) > 1:
            return False
    except ValueError:
        return False
    return _option(argv, "--arithmetic") != "float" and _option(argv, "--device") != "cuda"


def start_warmup(argv):
    """The warm-up workers for ``argv`` (:class:`pam.kernels.warm_worker.Workers`, one per
    core, each compiling its part of the manifest), or None when not wanted."""
    if not wants_warmup(argv):
        return None
    spec = importlib.util.find_spec("pam")                 # locates pam, does not import it
    if spec is None or not spec.submodule_search_locations:
        return None
    pam_dir = list(spec.submodule_search_locations)[0]
    path = os.path.join(pam_dir, "kernels", "warm_worker.py")
    loader = importlib.util.spec_from_file_location("_pam_warm_worker", path)
    worker = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(worker)
    manifest = os.path.join(pam_dir, "kernels", "warm_manifest.json")
    if os.path.exists(worker.marker_path(pam_dir, manifest, WORKLOAD)):
        return None                                      # the warm-up already ran
    parts = worker.cores()
    return worker.spawn(pam_dir, manifest, WORKLOAD, parts, range(parts))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        workers = start_warmup(argv)
    except Exception:            # the warm-up is an optimization: cli's own path decides
        workers = None
    try:
        from .cli import main as cli_main
        return cli_main(argv, warmup_workers=workers)
    except KeyboardInterrupt:                        # while loading, before cli's handler
        return 130
    finally:
        if workers is not None:
            workers.kill()
