"""The README's commands and Python example work, as written, on the shipped samples.

Every line of the ```bash / ```sh / ```shell code blocks (and every ``$ `` line of ```console
blocks) of README.md and configs/README.md is one test, and so is every ```python block. Each
runs in a fresh temporary folder holding copies of the folders the README uses (configs/,
data_samples/, ...), so outputs such as ``--out out/demo`` land there, never in the checkout.
``medcam3d`` and ``python`` are this interpreter's. A command must exit 0, or the code its line
states in a comment (``# exits 2``). ``make ...`` lines are checked with ``make -n`` in the
repository: the target exists and its recipe expands; ``make test`` and ``make demo`` themselves
are what .ci/run runs on a clean clone.

Commands that the test cannot run are in ``NOT_RUN`` with the reason. Runs that take more than a
few seconds are marked ``slow``: ``pytest -m "not slow"`` leaves them out.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", ROOT / "configs" / "README.md"]
COPIED = ["configs", "data_samples", "notebooks", "benchmarks", "docs"]  # what README commands read
SHELLS = {"bash", "sh", "shell", "console"}
TIMEOUT_S = 1800  # `medcam3d evaluate` takes a few minutes on 2 busy cores

# Commands not run here, each with why. Matched against the start of the command.
NOT_RUN = {
    # Installs packages from the network (a CUDA build of torch); `make` does the CPU set-up.
    "python3 -m venv": "installs packages from the network",
    "pip install": "installs packages from the network",
    # The test suite itself: running it from inside the suite would recurse.
    "pytest": "runs the test suite that runs this test",
    ".venv/bin/python -m pytest": "runs the test suite that runs this test",
}
# Fast enough for `pytest -m "not slow"`; the rest build models and explain scans.
QUICK = re.compile(r"^(make |medcam3d (info|--help)\b)")
# README commands that fail because of code, not of the README: {command start: reason}.
KNOWN_FAILURES: dict[str, str] = {}


def _blocks(path: Path) -> list[tuple[str, int, str]]:
    """(language, line number of the first line, text) of each fenced code block."""
    blocks, language, start, lines = [], None, 0, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fence = re.match(r"^\s*```\s*([\w+-]*)", line)
        if fence and language is None:
            language, start, lines = fence.group(1).lower(), number + 1, []
        elif fence:
            blocks.append((language, start, "\n".join(lines)))
            language = None
        elif language is not None:
            lines.append(line)
    return blocks


def _commands(path: Path) -> list[tuple[int, str]]:
    """(line number, command) of each shell command; backslash continuations are joined."""
    found = []
    for language, start, text in _blocks(path):
        if language not in SHELLS:
            continue
        pending, first = "", 0
        for number, line in enumerate(text.splitlines(), start):
            if language == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if not pending:
                first = number
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            command, pending = (pending + line).strip(), ""
            if command and not command.startswith("#"):
                found.append((first, command))
    return found


def _expected_exit(command: str) -> int:
    stated = re.search(r"#.*\bexits? (?:with )?(?:code )?(\d+)", command)
    return int(stated.group(1)) if stated else 0


def _has_nnunet() -> bool:
    import importlib.util

    return importlib.util.find_spec("nnunetv2") is not None


def _params():
    params = []
    nnunet = _has_nnunet()
    for path in DOCUMENTS:
        name = path.relative_to(ROOT).as_posix()
        for number, command in _commands(path):
            marks = [] if QUICK.match(command) else [pytest.mark.slow]
            marks += [pytest.mark.skip(reason=f"not run by the tests: {reason}")
                      for start, reason in NOT_RUN.items() if command.startswith(start)]
            if "nnunet" in command and not command.startswith("pip install") and not nnunet:
                marks.append(pytest.mark.skip(reason="needs the extra medcam3d[nnunet] (make test and .ci/run install it)"))
            marks += [pytest.mark.xfail(reason=reason, strict=True)
                      for start, reason in KNOWN_FAILURES.items() if command.startswith(start)]
            params.append(pytest.param(command, marks=marks, id=f"{name}:{number}:{command[:60]}"))
    return params


def _python_params():
    params = []
    for path in DOCUMENTS:
        name = path.relative_to(ROOT).as_posix()
        params += [pytest.param(text, marks=pytest.mark.slow, id=f"{name}:{start}:python")
                   for language, start, text in _blocks(path) if language in {"python", "py"}]
    return params


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    for folder in COPIED:
        if (ROOT / folder).is_dir():
            shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUTF8="1", MPLBACKEND="Agg")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _run(args, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S, **kwargs)


def test_the_readmes_have_commands():
    assert len(_params()) >= 6 and _python_params()


@pytest.mark.parametrize("command", _params())
def test_readme_command(command: str, workdir: Path):
    if command.startswith("make "):
        done = _run(["make", "-n", *command.split("#")[0].split()[1:]], ROOT)
    else:
        done = _run(["bash", "-c", command], workdir)
    expected = _expected_exit(command)
    assert done.returncode == expected, (
        f"`{command}` exited {done.returncode}, expected {expected}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


@pytest.mark.parametrize("code", _python_params())
def test_readme_python(code: str, workdir: Path):
    done = _run([sys.executable, "-c", code], workdir)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def _pyproject_version() -> str:
    return re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M).group(1)


def test_import_is_light():
    """`import medcam3d` (and so `medcam3d --help`) does not load torch or MONAI."""
    probe = ("import sys; import medcam3d; "
             "print(sorted(m for m in ('torch', 'monai', 'nibabel', 'scipy') if m in sys.modules), medcam3d.__version__)")
    done = _run([sys.executable, "-c", probe], ROOT)
    assert done.returncode == 0, done.stderr
    loaded, version = done.stdout.rsplit(maxsplit=1)
    assert loaded == "[]" and version.strip() == _pyproject_version()

    import medcam3d

    assert all(getattr(medcam3d, name) is not None for name in medcam3d.__all__)
    from medcam3d import Explainer, Region  # noqa: F401  (the names still import directly)


@pytest.mark.slow
def test_the_readmes_demo_figure_is_what_the_demo_prints(tmp_path: Path):
    """The README's "both methods put the peak inside the lesion for **N of M** present lesions"."""
    found = re.search(r"both methods put the peak inside\s+the lesion for \*\*(\d+) of (\d+)\*\* present lesions",
                      (ROOT / "README.md").read_text(encoding="utf-8"))
    assert found, "the README no longer states the demo's figure; update this test"
    hits, lesions = int(found.group(1)), int(found.group(2))
    done = _run([sys.executable, "-m", "medcam3d", "demo", "--out", str(tmp_path / "demo")], ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    for method in ("hirescam", "gradcam"):
        line = re.search(rf"^{method}: peak inside the true lesion for (\d+)% of present lesions \((\d+)\)$",
                         done.stdout, re.M)
        assert line, done.stdout[-3000:]
        assert int(line.group(2)) == lesions and round(int(line.group(1)) * lesions / 100) == hits, line.group(0)
