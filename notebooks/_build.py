"""Build notebooks/*.ipynb (no outputs) with nbformat."""
import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook


def notebook(cells):
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    out = []
    for kind, text in cells:
        if kind == "md":
            out.append(new_markdown_cell(text.strip()))
        else:
            cell = new_code_cell(text.strip())
            if kind == "parameters":
                cell.metadata["tags"] = ["parameters"]
            out.append(cell)
    for i, cell in enumerate(out):
        cell["id"] = f"cell-{i}"
    nb.cells = out
    return nb


COMPARE = [
    ("md", """
# Compare two checkpoints: magnitude and direction change per weight

For every linear weight, the DoRA paper's decomposition (Section 3.2): per output unit the magnitude
`m = ||W[n, :]||` and the direction `W[n, :] / m`; then **ΔM** = mean `|m - m0|` and **ΔD** = mean
`1 - cos(W[n, :], W0[n, :])` over output units.

Change the paths in the next cell (tagged `parameters`) to run this on your own checkpoints: any
`.safetensors`/`.bin` file, Hugging Face model folder, Trainer `checkpoint-<step>` folder, or a
PEFT LoRA/DoRA adapter folder over `BASE`. The defaults point at `python -m dora_analysis demo`'s output.
"""),
    ("parameters", """
BASE = ""  # the pre-trained checkpoint; "" = the packaged all-MiniLM-L6-v2 the demo trains on
TUNED = "../dora_demo/runs/ft/checkpoint-100"  # a fine-tuned checkpoint or adapter folder
INCLUDE = None  # a regular expression on tensor names, e.g. r"attention\\.self"; None = all linear weights
"""),
    ("code", """
import pandas as pd

from dora_analysis.compare import compare
from dora_analysis.training import default_model_path

base = BASE or default_model_path()
df = compare(base, TUNED, include=INCLUDE)
print(f"{len(df)} tensors compared; statuses: {df['status'].value_counts().to_dict()}")
df[["tensor", "layer", "module", "shape", "delta_magnitude", "delta_direction", "status"]].head(20)
"""),
    ("md", "Mean change per module (over layers):"),
    ("code", """
summary = df.groupby("module")[["delta_magnitude", "delta_direction"]].mean().sort_values("delta_direction")
summary
"""),
    ("md", "The per-layer view: ΔM and ΔD of each module across the depth of the network."),
    ("code", """
import matplotlib.pyplot as plt

layered = df[df["layer"].notna()]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for module, rows in layered.groupby("module"):
    rows = rows.sort_values("layer")
    axes[0].plot(rows["layer"], rows["delta_magnitude"], marker="o", label=module)
    axes[1].plot(rows["layer"], rows["delta_direction"], marker="o", label=module)
axes[0].set(xlabel="layer", ylabel="ΔM", title="magnitude change")
axes[1].set(xlabel="layer", ylabel="ΔD", title="direction change", yscale="log")
axes[0].legend(fontsize="small")
fig.tight_layout()
"""),
]

DYNAMICS = [
    ("md", """
# Training dynamics: how magnitude and direction move together (the paper's Figure 2)

Every checkpoint of every run is compared with the pre-trained weights (each base tensor is read once).
One point is one weight matrix at one step: x = ΔD, y = ΔM, marker = step, colour = layer. The paper
reports Pearson r of FT -0.62, DoRA -0.31 and LoRA +0.83 (query matrices of VL-BART).

Set `RUNS` to your own training output folders (each holding `checkpoint-<step>/` folders: full
weights or PEFT adapters) in the next cell. The defaults are the demo's runs.
"""),
    ("parameters", """
RUNS = ["../dora_demo/runs/ft", "../dora_demo/runs/lora", "../dora_demo/runs/dora"]  # run folders
BASE = None  # the pre-trained checkpoint; None = the base_model named in each run's run.json
MODULE = "query"  # which matrices to draw: query, value, key, ...
"""),
    ("code", """
from dora_analysis.correlation import correlations
from dora_analysis.series import analyze_series
from dora_analysis.figures import direction_magnitude_figure, final_layers_figure, training_curves_figure
from dora_analysis.series import training_history

series = analyze_series(BASE, RUNS)
series.groupby(["method", "step"])[["delta_magnitude", "delta_direction", "eval_metric"]].mean()
"""),
    ("md", """
Pearson r of (ΔD, ΔM) per method and module, pooled over layers and steps, with a 95% bootstrap
interval; `r_within_step` and `r_within_layer` remove the differences between steps or between layers.
"""),
    ("code", """
table = correlations(series)
table.round(3)
"""),
    ("code", """
fig = direction_magnitude_figure(series, MODULE, table)
"""),
    ("md", "ΔM and ΔD per layer at each run's final step (the paper's Figure 3):"),
    ("code", """
fig = final_layers_figure(series, MODULE)
"""),
    ("code", """
history = training_history(RUNS)
fig = training_curves_figure(history)
"""),
]

ADAPTERS = [
    ("md", """
# A PEFT LoRA/DoRA adapter: what it does to the base weights

Point `ADAPTER` at any PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`) and
`BASE` at the model it was trained on. The adapter is merged as PEFT merges it (`W0 + s*B@A` for LoRA,
`m * (W0 + s*B@A) / ||W0 + s*B@A||_c` for DoRA, `s = lora_alpha / r`) and compared with the base.
"""),
    ("parameters", """
BASE = ""  # the base model the adapter was trained on; "" = the packaged all-MiniLM-L6-v2
ADAPTER = "../dora_demo/runs/dora/checkpoint-100"  # a PEFT LoRA/DoRA adapter folder
"""),
    ("code", """
import json
from pathlib import Path

from dora_analysis.compare import compare
from dora_analysis.training import default_model_path

config = json.loads((Path(ADAPTER) / "adapter_config.json").read_text())
{key: config.get(key) for key in ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "target_modules",
                                  "modules_to_save", "base_model_name_or_path")}
"""),
    ("code", """
base = BASE or default_model_path()
df = compare(base, ADAPTER)
df[["tensor", "layer", "module", "delta_magnitude", "delta_direction", "base_magnitude_mean",
    "tuned_magnitude_mean", "status"]]
"""),
    ("md", """
Per module: DoRA trains the magnitude directly, so its ΔM can move independently of ΔD; with LoRA
both come from the same low-rank update.
"""),
    ("code", """
df.groupby("module")[["delta_magnitude", "delta_direction"]].agg(["mean", "max"])
"""),
    ("code", """
import matplotlib.pyplot as plt

adapted = df[df["layer"].notna()]
fig, ax = plt.subplots(figsize=(5, 4))
for module, rows in adapted.groupby("module"):
    ax.scatter(rows["delta_direction"], rows["delta_magnitude"], label=module)
    for row in rows.itertuples():
        ax.annotate(str(int(row.layer)), (row.delta_direction, row.delta_magnitude), fontsize=8)
ax.set(xlabel="ΔD", ylabel="ΔM", title="per weight (numbers: layer)")
ax.legend()
fig.tight_layout()
"""),
]

for name, cells in (("01_compare_two_checkpoints", COMPARE), ("02_training_dynamics", DYNAMICS),
                    ("03_peft_adapters", ADAPTERS)):
    nb = notebook(cells)
    nbformat.validate(nb)
    nbformat.write(nb, f"/work/main/notebooks/{name}.ipynb")
    print(name, len(nb.cells))
