"""Every shell command of README.md and docs/*.md runs as written (``tests/doc_commands.py`` extracts them).

Writing a documented command (the rules this test holds the docs to):

- a fenced ``bash`` block, or a code span starting with a program in a table's ``command`` column, is run;
- write it so that it runs as written from the repository root on the committed sample (``tests/data``) in well
  under a minute on 2 CPU cores (small flags, with a sentence saying which to drop for a real run);
  ``DATA`` (an SA-Med2D folder) and ``STUDIES`` (a folder of volumes) are the only placeholders;
- a block that cannot run here (a GPU, ``../shared/data``, a measurement of minutes) follows the line
  ``<!-- docs-test: arguments only: REASON -->``: its arguments are checked (argparse, config ids), not run;
  every command of ``docs/benchmarks.md`` and every ``scripts/benchmark_*.py`` command is checked that way;
- a file the reader writes is a fenced block after a line ending in its path in backticks and a colon.

How they run: in one copy of the repository, in the order of ``DOC_ORDER`` and of each file, as a reader who
follows the documentation runs them: a later command uses what an earlier one wrote (``data/sa_med2d``,
``models/model.pt``, ``out/site1``, ...). A command written twice runs once. ``python``, ``monailabel``,
``torchrun`` and ``.venv`` are this test environment's. A plain ``python -m MODULE ...`` / ``python SCRIPT ...``
command runs in a fork of a warm interpreter (``tests/warm_python.py``: the same interpreter, environment, folder
and arguments, with torch and monai imported: 7 s less a command); anything else, and ``QUIET_COMMAND``, in bash.
Everything else the test changes is listed here:

- ``PLACEHOLDERS``: the words that stand for the reader's own folders are replaced by the sample's;
- ``PROVIDED``: files the documentation tells the reader to bring (third-party weights, a folder of volumes) are
  made before the commands run;
- ``torchrun --nproc_per_node N`` (GPUs) runs ``min(N, 2)`` processes on a machine without CUDA;
- ``monailabel start_server`` gets ``--port <free port>`` appended (8000 may be taken), runs until ``/info/`` lists
  the ``sam_unet`` model, and is stopped;
- ``pytest`` on this suite: CI runs the whole suite with the README's command (``.ci/run`` must run it verbatim),
  so here the named test files must exist;
- ``bash scripts/setup.sh``: runs only where it has nothing to install (CI, right after its own setup), as it would
  otherwise reinstall the environment this suite runs in.

Some commands are followed by checks of what they wrote (``CHECKS``): a mask that overlaps the tumour, a model that
loads, an evaluation report, ONNX files, a federated summary without failure; no run prints the third-party noise
of ``bundle.quiet``, and the default inference run prints at most ``QUIET_LINES`` lines before its result.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import runpy
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from doc_commands import DocCommand, DocFile, documented_commands

REPO = Path(__file__).resolve().parents[1]

#: the order in which documents run: the training guide makes the data and the model the others use
DOC_ORDER = [
    "docs/training.md",
    "docs/deployment.md",
    "docs/federated.md",
    "docs/monailabel.md",
    "docs/README.md",
    "README.md",
]
MEASUREMENT_DOCS = ["docs/benchmarks.md"]
#: every document: DOC_ORDER, then any other docs/*.md, then the measurement records
DOCS = (
    DOC_ORDER
    + sorted({p.relative_to(REPO).as_posix() for p in REPO.glob("docs/*.md")} - set(DOC_ORDER + MEASUREMENT_DOCS))
    + MEASUREMENT_DOCS
)

#: placeholder -> what it stands for here (whole words only)
PLACEHOLDERS = {
    "DATA": "data/sa_med2d",  # an SA-Med2D folder: the sample converted by docs/training.md's first command
    "STUDIES": "studies",  # a folder of volumes: PROVIDED below
}

#: the noise bundle.quiet filters; a run that prints any of these is a failure
THIRD_PARTY_NOISE = ("nvImageCodec", "Importing from timm", "always_return_as_numpy")

SERVER_TIMEOUT = 600
COMMAND_TIMEOUT = 1200

pytestmark = [pytest.mark.slow, pytest.mark.timeout(COMMAND_TIMEOUT + 300)]


# ------------------------------------------------------------------------------------------------------ the reader
def _sam_vit_b(path: Path) -> None:
    """Official SAM ViT-B weights in segment_anything's layout: seeded random values (the file is third-party)."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    torch.save(sam_model_registry["vit_b"]().state_dict(), path)


def _studies(path: Path) -> None:
    path.mkdir()
    shutil.copy2(REPO / "tests" / "data" / "lung1_crop_image.nrrd", path / "lung1_crop.nrrd")


#: files the documentation tells the reader to bring -> how the test makes them
PROVIDED = {"models/sam_vit_b_01ec64.pth": _sam_vit_b, "studies": _studies}


def _checkout_files(repo: Path) -> list[str]:
    """The repository's files as a clone has them (tracked, plus new files git does not ignore)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=repo,
            capture_output=True,
            check=True,
        ).stdout.decode()
        return [f for f in listed.split("\0") if f and (repo / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "eval", "runs", "data", "out", "cache", "__pycache__", ".pytest_cache"}
        return [
            p.relative_to(repo).as_posix()
            for p in repo.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(repo).parts) and p.suffix not in (".pt", ".onnx", ".ts")
        ]


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    """A copy of the repository as a reader has it after ``scripts/setup.sh``; commands run in it."""
    root = tmp_path_factory.mktemp("docs") / "repo"
    for name in _checkout_files(REPO):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    (root / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    (root / "models").mkdir(exist_ok=True)
    return root


def _env(root: Path) -> dict:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return dict(os.environ, PATH=path, PYTHONPATH=str(root), PYTHONUNBUFFERED="1", MPLBACKEND="Agg")


# ----------------------------------------------------------------------------------------------- what gets run
def _substitute(text: str) -> str:
    for word, value in PLACEHOLDERS.items():
        text = re.sub(rf"(?<![\w./-]){word}(?![\w./-])", value, text)
    if not torch.cuda.is_available():
        text = re.sub(r"(--nproc_per_node)[ =](\d+)", lambda m: f"{m.group(1)} {min(int(m.group(2)), 2)}", text)
    return text


def _items() -> list:
    """Commands (after the placeholders) and files in run order; a command written twice is kept once."""
    seen, out = set(), []
    for item in documented_commands(REPO, DOCS):
        if isinstance(item, DocCommand):
            key = DocCommand(item.path, item.line, _substitute(item.text)).normalized
            if key in seen:
                continue
            seen.add(key)
        out.append(item)
    return out


ITEMS = _items()


def _label(item) -> str:
    if isinstance(item, DocFile):
        return f"{item.id} file {item.name}"
    words = item.normalized.split()
    checked = " (arguments)" if item.arguments_only or item.path in MEASUREMENT_DOCS else ""
    return f"{item.id} {' '.join(words[:4])[:60]}{checked}"


# ------------------------------------------------------------------------------------------------- special kinds
_PYTEST = re.compile(r"(?:^|&&\s*)(?:\S*python -m pytest|pytest)\s+(.*)$")


def _run_suite_command(root: Path, item: DocCommand) -> None:
    args = [a for a in shlex.split(_PYTEST.search(item.normalized).group(1)) if not a.startswith("-")]
    if any(Path(a).parts == ("tests",) for a in args):
        ci = (REPO / ".ci" / "run").read_text().splitlines()
        assert item.normalized in [" ".join(shlex.split(line, comments=True)) for line in ci], (
            f"{item.id}: CI (.ci/run) must run the whole suite with this documented command: {item.normalized}"
        )
    for arg in args:
        path = Path(arg.split("::")[0])
        assert path.parts[0] == "tests" and (root / path).exists(), f"{item.id}: {arg} is not part of this suite"


def _setup_is_up_to_date(root: Path, text: str) -> bool:
    """What ``scripts/setup.sh`` compares with ``.venv/.installed`` (it installs nothing when they agree)."""
    extras = re.search(r"EXTRAS=(\S+)", text)
    extras = extras.group(1) if extras else "lite,label,fl,tracking,export,dev"
    digest = hashlib.sha256((root / "constraints.txt").read_bytes() + (root / "setup.cfg").read_bytes())
    stamp = Path(sys.prefix) / ".installed"
    return stamp.is_file() and stamp.read_text().strip() == f"{digest.hexdigest()[:16]} {extras}"


class _ArgumentsAccepted(BaseException):
    """Raised once a script's arguments parsed; a BaseException, so a script's catch-all error report lets it by."""


def _check_script_arguments(root: Path, argv: list[str], monkeypatch, capsys) -> None:
    """Parse a script's arguments with its own argparse parser, and stop there (nothing runs)."""
    parse = argparse.ArgumentParser.parse_known_args  # parse_args calls it too

    def accept(self, *args, **kwargs):
        parse(self, *args, **kwargs)
        raise _ArgumentsAccepted

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", accept)
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(root)
    try:
        runpy.run_path(str(root / argv[0]), run_name="__main__")
    except _ArgumentsAccepted:
        return
    except SystemExit as stop:
        pytest.fail(f"{argv[0]} refuses the documented arguments (exit {stop.code}): {capsys.readouterr().err}")
    pytest.fail(f"{argv[0]} never parsed its arguments")


def _check_bundle_arguments(root: Path, argv: list[str]) -> None:
    """``python -m monai.bundle COMMAND [NET_ID] --config_file ... --name value``: the configs exist, and every name is
    an argument of MONAI's ``COMMAND`` or (for ``run``) a config id; a ``NET_ID`` is a config id."""
    import inspect

    import monai.bundle.scripts
    from monai.bundle import ConfigParser

    assert argv[:2] == ["-m", "monai.bundle"], argv
    command, rest = argv[2], argv[3:]
    net_id = rest.pop(0) if rest and not rest[0].startswith("--") else None
    options = dict(zip(rest[::2], rest[1::2]))
    files = options.pop("--config_file")
    files = ast.literal_eval(files) if files.startswith("[") else [files]
    parser = ConfigParser()
    parser.read_config([str(root / f) for f in files])
    accepted = set(inspect.signature(getattr(monai.bundle.scripts, command)).parameters)
    unknown = [k for k in options if k[2:] not in accepted and not (command == "run" and k[2:] in parser)]
    assert not unknown, f"neither arguments of monai.bundle {command} nor config ids of {files}: {unknown}"
    assert net_id is None or net_id in parser, f"{net_id} is not a config id of {files}"


def _check_measurement(root: Path, item: DocCommand, monkeypatch, capsys) -> None:
    argv = shlex.split(_substitute(item.text).replace("\\\n", " "), comments=True)
    if argv[0] == "torchrun":  # its processes run what python -m would
        argv = ["python", *argv[argv.index("-m") :]]
    assert argv[0] == "python", f"{item.id}: expected a python command, got {argv[0]}"
    if argv[1] == "-m":
        _check_bundle_arguments(root, argv[1:])
    else:
        _check_script_arguments(root, argv[1:], monkeypatch, capsys)


def _serve(root: Path, text: str) -> dict:
    """Start the documented server command on a free loopback port, wait for ``/info/``, stop it."""
    from bundle.label.launch import free_port

    port = free_port()
    log = open(root / f"server-{port}.log", "wb")
    process = subprocess.Popen(
        ["bash", "-c", f"{text} --port {port}"],
        cwd=root,
        env=_env(root),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + SERVER_TIMEOUT
        while time.monotonic() < deadline:
            assert process.poll() is None, f"server exited ({process.returncode}):\n{_tail(root / log.name)}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/info/", timeout=5) as response:
                    info = json.loads(response.read())
                if "sam_unet" in info.get("models", {}):
                    return info
            except (OSError, ValueError):
                pass
            time.sleep(1)
        pytest.fail(f"no /info/ after {SERVER_TIMEOUT} s:\n{_tail(root / log.name)}")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        log.close()


def _tail(path: Path, lines: int = 60) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


# ------------------------------------------------------------------------------------------- how a command runs

_SHELL_SYNTAX = re.compile(r"[*?\[\]$`~{}]")  # outside quotes: globs, expansions


def _plain_python(text: str) -> list[str] | None:
    """``argv`` after ``python`` when ``text`` is one ``python`` command with no shell syntax, else None."""
    line = text.replace("\\\n", " ")
    if _SHELL_SYNTAX.search(re.sub(r"'[^']*'|\"[^\"]*\"", "", line.split(" #")[0])):
        return None
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    words = list(lexer)
    if not words or words[0] != "python" or any(set(w) <= set("();<>|&") for w in words):
        return None
    return words[1:]


class WarmPython:
    """``tests/warm_python.py`` in the reader's copy: runs plain ``python`` commands in forks of one interpreter that
    has imported torch and monai already (the same interpreter, environment, folder and arguments; 7 s less a
    command on 2 cores). ``unfit`` says why it does not serve, if it does not."""

    def __init__(self, root: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(root / "tests" / "warm_python.py")],
            cwd=root,
            env=_env(root),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._buffer = b""
        first = self._reply(300)
        self.unfit = first.get("unfit") if first else "no ready line in 300 s"

    def _reply(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.process.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.process.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"the warm interpreter exited ({self.process.wait()})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def run(self, argv: list[str], cwd: Path, log: Path, timeout: float) -> int:
        request = {"argv": argv, "cwd": str(cwd), "log": str(log)}
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        pid = self._reply(60)["pid"]
        done = self._reply(timeout)
        if done is None:
            os.killpg(pid, signal.SIGKILL)
            self._reply(60)
            raise subprocess.TimeoutExpired(argv, timeout)
        return done["rc"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def warm(reader):
    interpreter = WarmPython(reader)
    yield interpreter
    interpreter.close()


def _run(root: Path, warm: WarmPython, text: str, item: DocCommand) -> tuple[int, str, str]:
    """Run one command in the reader's copy: (exit status, stdout and stderr as one text, how it ran)."""
    argv = _plain_python(text)
    if argv and not warm.unfit and item.normalized != QUIET_COMMAND:  # that one counts what a fresh process prints
        log = root / "logs" / f"{item.path.replace('/', '_')}-{item.line}.log"
        log.parent.mkdir(exist_ok=True)
        log.unlink(missing_ok=True)
        returncode = warm.run(argv, root, log, COMMAND_TIMEOUT)
        return returncode, log.read_text(errors="replace"), "warm interpreter"
    done = subprocess.run(
        ["bash", "-c", f"set -eo pipefail\n{text}"],
        cwd=root,
        env=_env(root),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    return done.returncode, done.stdout, "bash" + (f"; warm interpreter unfit: {warm.unfit}" if warm.unfit else "")


# ----------------------------------------------------------------------------------------------------- checks
def _written_since(path: Path, start: float) -> bool:
    return path.is_file() and path.stat().st_mtime >= start - 1


def _dice_with_label(mask_path: Path, label_path: Path, value: int | None = None) -> float:
    """Dice of a written mask (its label ``value``; any label when None) with a label file's foreground."""
    from bundle.io import load_image

    written, label = (np.asarray(load_image(str(p)))[0] for p in (mask_path, label_path))
    mask, label = (written > 0 if value is None else written == value), label > 0
    assert mask.shape == label.shape, (mask.shape, label.shape)
    return 2 * float((mask & label).sum()) / max(1.0, float(mask.sum() + label.sum()))


#: the one command whose output is counted: what a default inference run prints before its result
QUIET_COMMAND = (
    "python -m monai.bundle run --config_file configs/inference.json --input_image tests/data/lung1_crop_image.nrrd "
    "--modality ct --box [34,33,2,61,62,4] --output_dir out"
)
QUIET_LINES = 10


def _check_sample_mask(root: Path, start: float, output: str, command: str) -> None:
    mask = root / "out" / "lung1_crop_image_seg.nii.gz"
    assert _written_since(mask, start), f"no new mask {mask}"
    if "vit_b.json" in command:  # a converted SAM: the fresh conv branch makes its masks meaningless
        return
    assert re.search(r"lung1_crop_image\.nrrd: .*slice", output), f"no progress bar of the slices:\n{output[-3000:]}"
    tumour = 1 if "--objects" in command else None  # a label map: 1 is the tumour (the first object)
    dice = _dice_with_label(mask, REPO / "tests" / "data" / "lung1_crop_label.nrrd", tumour)
    assert dice > 0.6, f"the documented prompt gives a mask with Dice {dice:.3f} against the tumour"
    if "inference_trt.json" in command and not torch.cuda.is_available():
        assert output.count("running the network in PyTorch") == 1, output[-3000:]
    if command == QUIET_COMMAND:
        before = output[: output.index("mask written to")].split("\n")[:-1]
        assert len(before) <= QUIET_LINES, f"the default run printed {len(before)} lines first:\n" + "\n".join(before)


def _check_model(root: Path, start: float, output: str, command: str) -> None:
    from bundle.networks.weights import read_checkpoint

    ckpt_dir = re.search(r"--ckpt_dir (\S+)", command)
    model = root / (ckpt_dir.group(1) if ckpt_dir else "models") / "model.pt"
    assert _written_since(model, start), f"training wrote no new {model}:\n{output[-3000:]}"
    assert re.search(r"\[\d+/\d+\] +\d+%\|", output), f"no progress bar of the iterations:\n{output[-3000:]}"
    state, contract = read_checkpoint(model)
    assert state and contract, model


def _check_evaluation(root: Path, start: float, output: str, command: str) -> None:
    report = root / "eval" / "evaluation"
    if "configs/train_auto.json" in command:  # a task model: MONAI's MetricsSaver
        assert _written_since(report / "mean_dice_summary.csv", start), output[-3000:]
        return
    if "--eval_datalist" in command:  # label maps: per-label figures
        assert _written_since(report / "objects" / "summary.json", start), output[-3000:]
        assert _written_since(report / "objects" / "per_label.csv", start), output[-3000:]
        return
    assert _written_since(report / "summary.json", start), output[-3000:]
    assert list((report / "worst").glob("*.png"))
    assert re.search(r"\[\d+/\d+\] +\d+%\|", output), f"no progress bar of the batches:\n{output[-3000:]}"


def _check_export(root: Path, start: float, output: str, command: str) -> None:
    for name in ("encoder.onnx", "decoder.onnx"):
        assert _written_since(root / "models" / name, start), name
    assert "ONNX export" in output and "stage" in output, f"no progress bar of the stages:\n{output[-3000:]}"


def _check_federated(root: Path, start: float, output: str, command: str) -> None:
    workspace = root / shlex.split(command.split("--workspace")[1])[0]
    summary = json.loads((workspace / "summary.json").read_text())
    assert not summary["failed"] and summary["global_model"], summary
    assert len(summary["sites"]) == 2 and all(not s.get("error") for s in summary["sites"].values()), summary


#: command pattern -> check of what it wrote (the first matching pattern applies)
CHECKS = [
    (r"--config_file \S*evaluate\.json", _check_evaluation),
    (r"inference\w*\.json.* --input_image tests/data/lung1_crop_image\.nrrd", _check_sample_mask),
    (r"(monai\.bundle run|torchrun) .*configs/train\.json", _check_model),
    (r"scripts/export\.py", _check_export),
    (r"scripts/fl_simulate\.py", _check_federated),
]


# ------------------------------------------------------------------------------------------------------- tests
def test_every_document_is_read():
    found = {p.relative_to(REPO).as_posix() for p in REPO.glob("docs/*.md")} | {"README.md"}
    assert found == set(DOCS)
    commands = [i for i in ITEMS if isinstance(i, DocCommand)]
    assert len(commands) >= 20
    assert QUIET_COMMAND in [i.normalized for i in commands], "the quiet check lost its command"


@pytest.mark.parametrize("item", ITEMS, ids=[_label(i) for i in ITEMS])
def test_documented_command(item, reader, warm, monkeypatch, capsys):
    root = reader
    if isinstance(item, DocFile):
        (root / item.name).parent.mkdir(parents=True, exist_ok=True)
        (root / item.name).write_text(item.content)
        return
    text = _substitute(item.text)
    for name, make in PROVIDED.items():
        if re.search(rf"(?<![\w./-]){re.escape(name)}(?![\w./-])", text) and not (root / name).exists():
            make(root / name)
    if item.arguments_only or item.path in MEASUREMENT_DOCS or re.search(r"scripts/benchmark_\w+\.py", text):
        _check_measurement(root, item, monkeypatch, capsys)
        return
    if _PYTEST.search(item.normalized):
        _run_suite_command(root, item)
        return
    if item.normalized.startswith(("pip ", "python -m pip ")):
        pytest.fail(f"{item.id}: document scripts/setup.sh (EXTRAS=...) instead of pip: {item.normalized}")
    if "scripts/setup.sh" in text and not _setup_is_up_to_date(root, text):
        pytest.skip("scripts/setup.sh would reinstall the environment this suite runs in (its stamp is outdated)")
    if item.normalized.startswith("monailabel start_server"):
        info = _serve(root, text)
        assert info["models"]["sam_unet"]["type"] == "deepgrow", info["models"]
        return
    start = time.time()
    returncode, output, how = _run(root, warm, text, item)
    print(f"$ {text}\n({how}, {time.time() - start:.1f} s)\n{output[-4000:]}")
    assert returncode == 0, f"{item.id}: exit {returncode}\n$ {text}\n{output[-6000:]}"
    noise = [n for n in THIRD_PARTY_NOISE if n in output]
    assert not noise, f"{item.id}: third-party noise {noise} in the output:\n{output[-4000:]}"
    for pattern, check in CHECKS:
        if re.search(pattern, item.normalized):
            check(root, start, output, item.normalized)
            break
