"""One error path: every failure a user can cause, in every command, is one line on stderr and exit 2,
with no traceback and nothing written."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import file_digests, save_tiny_bert

from dora_analysis.commands.main import main
from dora_analysis.errors import InputError


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """base/ and tuned/ (tiny BERTs), a file, a folder, an existing result, a symlink and a FIFO."""
    root = tmp_path_factory.mktemp("inputs")
    save_tiny_bert(root / "base", seed=0)
    save_tiny_bert(root / "tuned", seed=1)
    (root / "afile").write_text("x")
    (root / "afolder").mkdir()
    (root / "existing.csv").write_text("keep")
    (root / "link.csv").symlink_to(root / "existing.csv")
    os.mkfifo(root / "fifo")
    return root


def _state(root: Path) -> dict:
    """Every name and file content under root, to prove that nothing was written or changed."""
    names = sorted(str(p) for p in root.rglob("*"))
    return {"names": names, **file_digests(root / "base"), **file_digests(root / "tuned")}


OUT = ["--output", "{cwd}/out.csv"]
# (command line, what the one line must say). {root}: the inputs above; {cwd}: an empty folder.
CASES = [
    # compare: every option
    ("compare {root}/base {root}/tuned --include [", "--include"),
    ("compare {root}/base {root}/tuned --exclude (a", "--exclude"),
    ("compare {root}/base {root}/tuned --device xla", "--device"),
    ("compare {root}/base {root}/tuned --task-mb 8", "--task-mb"),
    ("compare {root}/base {root}/tuned --task-mb 0 --cluster", "--task-mb"),
    ("compare {root}/base {root}/tuned --device meta", "--device"),
    ("compare {root}/base {root}/tuned --device gpu0", "--device"),
    ("compare {root}/base {root}/tuned --format xml", "--format"),
    ("compare {root}/base {root}/tuned --format parquet", "--output"),
    ("compare {root}/base {root}/tuned --format csv --output {cwd}/out.json", "conflicts"),
    ("compare {root}/base {root}/tuned --output {root}/afolder", "is a folder"),
    ("compare {root}/base {root}/tuned --output {root}/afolder --overwrite", "is a folder"),
    ("compare {root}/base {root}/tuned --output {root}/afile/x.csv", "is a file, not a folder"),
    ("compare {root}/base {root}/tuned --output {cwd}/missing/x.csv", "does not exist"),
    ("compare {root}/base {root}/tuned --output {root}/existing.csv", "pass --overwrite"),
    ("compare {root}/base {root}/tuned --output {root}/link.csv --overwrite", "symbolic link"),
    ("compare {root}/base {root}/tuned --output {root}/fifo --overwrite", "not a regular file"),
    ("compare {root}/base {root}/tuned --output /dev/null --overwrite", "not a regular file"),
    ("compare {root}/base {root}/tuned --output {root}/tuned/config.json --overwrite", "one of the inputs"),
    ("compare {root}/base {root}/tuned --output {root}/base/model.safetensors --overwrite", "inputs"),
    ("compare {root}/base {root}/missing", "no such file"),
    ("compare {root}/base", "not an adapter"),  # TUNED may be omitted only for an adapter
    ("compare {root}/base {root}/tuned --bogus", "unrecognized"),
    # series
    ("series {root}/base {root}/tuned --include [", "--include"),
    ("series {root}/base {root}/tuned --device meta", "--device"),
    ("series {root}/base {root}/tuned --output {root}/afolder --overwrite", "is a folder"),
    ("series {root}/base {root}/tuned --output {root}/existing.csv", "pass --overwrite"),
    ("series {root}/base {root}/nothing", "no such run"),
    ("series {root}/base", "required: RUN"),
    # figures
    ("figures {root}/tuned --out {cwd}/figs", "--base"),
    ("figures {root}/tuned --base {root}/base --formats gif", "--formats"),
    ("figures {root}/tuned --base {root}/base --out {root}/afile", "--out"),
    ("figures {root}/tuned --base {root}/base --out {cwd}/missing/figs", "does not exist"),
    ("figures {root}/tuned --base {root}/base --out {cwd}/figs --modules nosuch", "--modules"),
    # train: every number has its range, checked before anything is read or written
    ("train --method ft --out {cwd}/run --max-train-examples 0", "--max-train-examples"),
    ("train --method ft --out {cwd}/run --max-eval-examples 0", "--max-eval-examples"),
    ("train --method ft --out {cwd}/run --steps 0", "--steps"),
    ("train --method ft --out {cwd}/run --save-every -1", "--save-every"),
    ("train --method lora --out {cwd}/run --rank 0", "--rank"),
    ("train --method lora --out {cwd}/run --alpha nan", "--alpha"),
    ("train --method lora --out {cwd}/run --dropout 1", "--dropout"),
    ("train --method ft --out {cwd}/run --lr 0", "--lr"),
    ("train --method ft --out {cwd}/run --lr inf", "--lr"),
    ("train --method ft --out {cwd}/run --momentum 1.5", "--momentum"),
    ("train --method ft --out {cwd}/run --batch-size 0", "--batch-size"),
    ("train --method ft --out {cwd}/run --max-length 0", "--max-length"),
    ("train --method ft --out {cwd}/run --seed -1", "--seed"),
    ("train --method ft --out {cwd}/run --seed 99999999999999999999", "--seed"),
    ("train --method ft --out {cwd}/run --threads 0", "--threads"),
    ("train --method lora --out {cwd}/run --targets ,", "--targets"),
    ("train --method xyz --out {cwd}/run", "--method"),
    ("train --method ft --out {cwd}/run --task nope", "--task"),
    ("train --method ft --out {cwd}/run --steps many", "--steps"),
    ("train --method ft --out {root}/afile", "--out"),
    ("train --method ft --out {cwd}/missing/run", "does not exist"),
    ("train --method ft --out {cwd}/run --model {root}/afolder", "config.json"),
    ("train --method ft --out {cwd}/run --optimizer sgd --model {root}/base", "--lr"),
    # demo
    ("demo --out {cwd}/d --steps 0", "--steps"),
    ("demo --out {cwd}/d --save-every 0", "--save-every"),
    ("demo --out {cwd}/d --threads 0", "--threads"),
    ("demo --out {cwd}/d --seed x", "--seed"),
    ("demo --out {root}/afile", "--out"),
    # no command at all
    ("", "required: COMMAND"),
    ("frobnicate", "invalid choice"),
]


@pytest.mark.parametrize(("line", "needle"), CASES, ids=[c[0].split(" {")[0] + " " + c[1] for c in CASES])
def test_user_errors_are_one_line_exit_2_and_write_nothing(
    root: Path, tmp_path: Path, capsys, monkeypatch, line: str, needle: str
) -> None:
    monkeypatch.chdir(tmp_path)
    before = _state(root)
    argv = line.format(root=root, cwd=tmp_path).split()
    code = main(argv)  # a traceback would raise here
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2, (line, captured.err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (line, captured.err)
    assert needle in lines[0], (line, lines[0])
    if "is a folder" in needle:  # --overwrite never replaces a folder: don't suggest it
        assert "--overwrite" not in lines[0]
    assert captured.out == "" and list(tmp_path.iterdir()) == [] and _state(root) == before, line


def test_hostile_names_are_escaped_and_long_messages_capped(tmp_path: Path, capsys) -> None:
    name = "evil\n\x1b[2J.weight"
    save_file({name: torch.ones(4, 4)}, tmp_path / "a.safetensors")
    save_file({name: torch.ones(4, 3)}, tmp_path / "b.safetensors")
    code = main(["compare", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "\x1b" not in err, err
    assert "evil\\n\\x1b[2J.weight" in err  # visible, as repr shows it
    message = str(InputError.of("x.pt", "record " + "9" * 900_000, tensor="t\n" * 1000))
    assert len(message) <= 1000 and "\n" not in message


def test_warnings_do_not_precede_the_error_line(tmp_path: Path, capsys, monkeypatch) -> None:
    import dora_analysis.analysis.comparison as comparison

    def noisy(*args, **kwargs):
        warnings.warn("TypedStorage is deprecated", UserWarning, stacklevel=1)
        raise InputError.of(args[1], "not a checkpoint")

    monkeypatch.setattr(comparison, "compare", noisy)
    code = main(["compare", str(tmp_path), str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines() == [f"error: {tmp_path}: not a checkpoint"]


def test_a_full_disk_is_one_line_and_leaves_no_temporary(root: Path, tmp_path: Path, capsys, monkeypatch):
    def full(self, text, *args, **kwargs):
        with open(self, "w") as handle:
            handle.write(text[: len(text) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", full)
    out = tmp_path / "deltas.csv"
    code = main(["compare", str(root / "base"), str(root / "tuned"), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "No space left on device" in err, err
    assert list(tmp_path.iterdir()) == []


def test_an_output_that_appears_during_the_analysis_is_not_replaced(root, tmp_path, capsys, monkeypatch):
    import dora_analysis.analysis.comparison as comparison

    out = tmp_path / "deltas.csv"
    real = comparison.compare

    def slow_compare(*args, **kwargs):
        out.write_text("someone else's")  # created after the check, before the write
        return real(*args, **kwargs)

    monkeypatch.setattr(comparison, "compare", slow_compare)
    code = main(["compare", str(root / "base"), str(root / "tuned"), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and str(out) in err, (
        err
    )  # the race itself: test_atomic.py
    assert out.read_text() == "someone else's" and [p.name for p in tmp_path.iterdir()] == ["deltas.csv"]


def _python(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, env=env, check=False
    )


WITHOUT = (
    "import sys; sys.modules[sys.argv.pop(1)] = None  # as if the extra were not installed\n"
    "from dora_analysis.commands.main import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "command", "extra"),
    [
        ("transformers", "train --method ft --out run", "train"),
        ("transformers", "demo --out run --quick", "train"),
        ("pyarrow", "compare {root}/base {root}/tuned --output deltas.parquet", "parquet"),
    ],
)
def test_a_missing_extra_says_which_to_install(root, tmp_path: Path, module, command, extra) -> None:
    done = _python(WITHOUT, module, *command.format(root=root).split(), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f'error: this needs {module}, which the [{extra}] extra installs: pip install "dora-analysis[{extra}]"'
    ]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_closed_pipe_ends_quietly(root: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "dora_analysis", "compare", str(root / "base"), str(root / "tuned")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    process.stdout.close()  # as `| head` does once it has its lines
    stderr = process.stderr.read().decode()
    assert process.wait() == 141, stderr  # 128 + SIGPIPE, as for `cat`
    assert stderr == "", stderr
