"""Smoke test of validation/parity_models.py: a quick run writes its table, JSON and plot,
and the PAM runs pass the audit."""
import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_run_writes_json_and_png(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "validation_parity_models", os.path.join(ROOT, "validation", "parity_models.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--quick", "--out", str(tmp_path)])
    with open(tmp_path / "parity_models.json") as f:
        saved = json.load(f)
    assert (tmp_path / "parity_models.png").stat().st_size > 0
    assert {(r["family"], r["arithmetic"]) for r in saved["rows"]} == {
        (f, a) for f in ("encoder_pre", "nanogpt_sdpa")
        for a in ("float", "pam", "pam_paper")}
    assert all(r["audit"] == "pass" for r in rows if r["arithmetic"] != "float")
    assert all(len(r["curve"]) == 4 for r in saved["runs"])
