"""notebooks/quickstart.ipynb: committed without outputs, and run end to end on CPU as CI runs it (QWEN3VL_CI=1:
the tiny MoE trained for 400 steps, asked, inspected, LoRA fine-tuned for 80 and reloaded), every figure drawn."""
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
FIGURES = ("ask", "grid", "attention", "router", "lora", "reload")  # cell tags


def test_committed_notebook_has_no_outputs():
  with open(NOTEBOOK) as f:
    nb = json.load(f)
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  dirty = [c["metadata"].get("tags") for c in code if c.get("outputs") or c.get("execution_count") is not None]
  assert code and not dirty, (f"cells {dirty} hold outputs: strip them "
                              "(jupyter nbconvert --clear-output --inplace notebooks/quickstart.ipynb)")
  assert "widgets" not in nb["metadata"]
  tags = [c["metadata"].get("tags", [None])[0] for c in code]
  assert set(FIGURES) <= set(tags) and tags[0] == "install"


def test_notebook_runs_on_cpu(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  for module in ("ipykernel", "matplotlib"):
    pytest.importorskip(module)
  work = tmp_path / "runs"
  monkeypatch.setenv("QWEN3VL_CI", "1")
  monkeypatch.setenv("QWEN3VL_WORK", str(work))
  monkeypatch.delenv("QWEN3VL_MODEL", raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))  # no pip
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()

  cells = {c.metadata["tags"][0]: c.outputs for c in nb.cells if c.cell_type == "code"}
  for tag in FIGURES:
    assert any("image/png" in o.get("data", {}) for o in cells[tag]), f"cell {tag!r} drew no figure"
  text = {tag: "".join(o.text for o in outs if o.output_type == "stream" and o.name == "stdout")
          for tag, outs in cells.items()}
  assert "held-out exact-match accuracy" in text["load"]
  for tag in ("ask", "reload"):
    assert re.search(r"exact match on 16 held-out questions: \d+/16", text[tag]), text[tag]
  assert "checkpoints" in text["reload"] and os.path.isdir(work / "lora" / "checkpoints" / "80")
  with open(work / "lora" / "metrics.jsonl") as f:
    losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
  assert len(losses) == 80 and sum(losses[-10:]) < sum(losses[:10]) / 2  # the new answer format is learned
