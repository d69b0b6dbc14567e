"""notebooks/quickstart.ipynb run top to bottom, as Colab would, on the tiny model on the CPU: it cannot rot."""

from __future__ import annotations

import json

import pytest
from helpers import ROOT

nbformat = pytest.importorskip("nbformat", reason="nbformat/nbclient are not installed (not on the GPU machine)")
nbclient = pytest.importorskip("nbclient", reason="nbformat/nbclient are not installed (not on the GPU machine)")


def test_quickstart_notebook_runs_top_to_bottom(tmp_path):
    notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    parameters = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    parameters.source += "\n\n# injected by the test\nINSTALL, TINY, STEPS, OUTPUT_DIR = False, True, 4, 'lora'"
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # the loss curve, the samples before and after, the generated image
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()
    summary = json.loads((tmp_path / "lora" / "train_summary.json").read_text())
    assert summary["steps"] == 4 and list((tmp_path / "outputs").glob("*.png"))
