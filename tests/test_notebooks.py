"""Every notebook runs top to bottom on tiny checkpoints, with its paths injected into the parameters cell."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from series_builders import make_runs

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("notebooks"), steps=(10, 20))


@pytest.fixture(scope="module")
def kernel_dirs(tmp_path_factory) -> list[str]:
    """A kernel spec that runs this very interpreter (the venv), whatever ``python`` is on PATH."""
    import json

    folder = tmp_path_factory.mktemp("kernels") / "dora-test-python"
    folder.mkdir()
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "dora-analysis tests",
        "language": "python",
    }
    (folder / "kernel.json").write_text(json.dumps(spec))
    return [str(folder.parent)]


def run_notebook(name: str, parameters: dict, cwd: Path, kernel_dirs: list[str]) -> nbformat.NotebookNode:
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    tagged[0].source = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    km = KernelManager(
        kernel_name="dora-test-python", kernel_spec_manager=KernelSpecManager(kernel_dirs=kernel_dirs)
    )
    NotebookClient(nb, km=km, timeout=180, resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_notebooks_are_saved_without_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert all(
            not c.get("outputs") and c.get("execution_count") is None
            for c in nb.cells
            if c.cell_type == "code"
        )
    assert {p.name for p in NOTEBOOKS.glob("*.ipynb")} == {
        "01_compare_two_checkpoints.ipynb",
        "02_training_dynamics.ipynb",
        "03_peft_adapters.ipynb",
        "04_update_spectrum.ipynb",
        "05_tracking.ipynb",
    }


@pytest.mark.slow
def test_compare_notebook(tiny, tmp_path, kernel_dirs):
    base, runs, _ = tiny
    nb = run_notebook(
        "01_compare_two_checkpoints.ipynb",
        {"BASE": str(base), "TUNED": str(runs["ft"] / "checkpoint-20"), "INCLUDE": None},
        tmp_path,
        kernel_dirs,
    )
    text = outputs_text(nb)
    assert "tensors compared" in text and "encoder.layer.1.attention.self.query.weight" in text
    assert images(nb) == 1


def loss_only_runs(runs: dict, root: Path) -> list[str]:
    """Copies of the tiny runs as a Hugging Face Trainer without ``compute_metrics`` leaves them:
    ``eval_loss`` only, and no ``run.json`` (the method comes from each checkpoint's files)."""
    import json
    import shutil

    copies = []
    for method in ("ft", "lora", "dora"):
        target = root / method
        shutil.copytree(runs[method], target)
        (target / "run.json").unlink()
        for state in target.glob("checkpoint-*/trainer_state.json"):
            data = json.loads(state.read_text())
            for entry in data["log_history"]:
                entry.pop("eval_accuracy", None)
            state.write_text(json.dumps(data))
        copies.append(str(target))
    return copies


@pytest.mark.slow
def test_training_dynamics_notebook_on_runs_that_logged_only_eval_loss(tiny, tmp_path, kernel_dirs):
    base, runs, _ = tiny
    nb = run_notebook(
        "02_training_dynamics.ipynb",
        {
            "RUNS": loss_only_runs(runs, tmp_path / "runs"),
            "BASE": str(base),
            "MODULE": "value",
            "STACK": None,
        },
        tmp_path,
        kernel_dirs,
    )
    text = outputs_text(nb)
    assert "r_within_layer" in text and "spearman" in text and "dora" in text
    assert "eval_loss" in text and "eval_accuracy" not in text
    assert images(nb) == 3  # ΔM vs ΔD, per layer, and the curves (held-out loss beside training loss)


@pytest.mark.slow
def test_peft_adapter_notebook(tiny, tmp_path, kernel_dirs):
    base, runs, _ = tiny
    nb = run_notebook(
        "03_peft_adapters.ipynb",
        {"BASE": str(base), "ADAPTER": str(runs["dora"] / "checkpoint-20")},
        tmp_path,
        kernel_dirs,
    )
    text = outputs_text(nb)
    assert "'use_dora': True" in text and "value" in text
    assert images(nb) == 1


@pytest.mark.slow
def test_update_spectrum_notebook(tiny, tmp_path, kernel_dirs):
    base, runs, _ = tiny
    nb = run_notebook(
        "04_update_spectrum.ipynb",
        {"RUNS": [str(runs[m]) for m in ("ft", "lora", "dora")], "BASE": None, "MODULE": "value"},
        tmp_path,
        kernel_dirs,
    )
    text = outputs_text(nb)
    assert "effective_rank" in text.replace("update_", "") and "subspace_to_final" in text
    assert images(nb) == 3


@pytest.mark.slow
def test_tracking_notebook(tmp_path, kernel_dirs):
    from tiny_models import save_tiny_encoder

    model = save_tiny_encoder(tmp_path / "tiny")
    nb = run_notebook(
        "05_tracking.ipynb",
        {"MODEL": str(model), "METHOD": "dora", "STEPS": 4, "EVERY": 2, "OUT": str(tmp_path / "run")},
        tmp_path,
        kernel_dirs,
    )
    text = outputs_text(nb)
    assert "3 steps x" in text and "dora/attention.self.query/delta_magnitude" in text
    assert images(nb) == 2  # the query and value trajectories
    assert (tmp_path / "run" / "deltas.csv").is_file()
