"""The quickstart notebook is valid and its code runs top to bottom (no Jupyter needed)."""

import json

from conftest import ROOT


def test_quickstart_notebook_runs(monkeypatch):
    nb = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
    assert nb["nbformat"] == 4
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(code) >= 4
    monkeypatch.chdir(ROOT / "notebooks")
    namespace: dict = {}
    for cell in code:
        exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), namespace)
    assert len(namespace["table"]) == 8
    assert namespace["ladder_ms"]["predicted ms"].gt(0).all() and namespace["p"].latency_ms > 0
    assert namespace["result"].status == "ok" and namespace["result"].fid_extractor == "randconv-v1"
    assert namespace["found"]["trained"] == 2 and (namespace["run_dir"] / "pareto.png").is_file()
