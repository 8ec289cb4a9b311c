"""Test-wide settings: under CI (CI=true) hypothesis runs derandomized, so a submission's
CI result is reproducible; locally it explores new examples on every run. When the session
includes tests/test_no_float_mul_ir.py, its compile-everything IR scan starts in a
subprocess right after collection and runs beside the other tests."""
import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_collection_finish(session):
    for item in session.items:
        if getattr(item, "module", None) is not None and \
                item.module.__name__.endswith("test_no_float_mul_ir"):
            session.config.pam_ir_scan = item.module.start_scan()
            return


def pytest_unconfigure(config):
    proc = getattr(config, "pam_ir_scan", None)
    if proc is not None and proc.poll() is None:    # the session ended before the scan test
        proc.kill()
        proc.communicate()


# `bdia-pam train` compiles the kernels in parallel worker processes on a cold cache
# (pam.kernels.warmup); the suite's CLI tests run with lazy compilation instead and
# tests/test_warmup.py tests the warm-up itself.
os.environ.setdefault("PAM_WARMUP", "0")
