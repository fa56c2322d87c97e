"""The README's commands do what their comments say on the machine they name.

Every ```bash block after a ``<!-- readme-check: cpu -->`` marker is parsed (continuation lines joined,
``# comments`` dropped, quotes respected) and its commands run in order on CPU, from a scratch folder that
stands in for the checkout root (``$PWD`` in an ``export`` means the checkout; the files a command names are
copied there), with tiny settings appended (6 training steps at L = 64, 4 evaluation blocks, 4 sampling steps at
L = 32; the README's own flags stay, later flags win). The ``mdlm`` commands run in this process through
``mdlm.cli.main`` -- the ``mdlm`` console entry point -- and ``python -c`` snippets through ``exec``.

Also: the README's first training command is the CPU-sized ``--quick`` one, the quick run learns (validation
NELBO falls), and every ``mdlm`` / ``torchrun`` command outside the checked blocks names a GPU machine in its
comment. Needs the data folder the README's ``export`` points to (skips otherwise)."""
import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
MARK = "<!-- readme-check: cpu -->"

TINY = {
    "train": ["model.length=64", "trainer.max_steps=6", "trainer.val_every=3", "trainer.save_every=0",
              "trainer.val_blocks=4", "loader.global_batch_size=4", "lr_scheduler.warmup_steps=1", "optim.lr=3e-3",
              "trainer.num_samples=0"],
    "eval": ["--max-blocks", "4", "--batch-size", "4"],
    "sample": ["--steps", "4", "model.length=32"],     # first_hitting: one model call per token
}


def _blocks(text: str, checked: bool):
    """(commands of each ```bash block) -- after the marker when ``checked``, the others otherwise. A command is
    a list of lines (continuations joined) with its comment kept for the caller."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            marked = i > 0 and lines[i - 1].strip() == MARK
            j = i + 1
            body = []
            while lines[j].strip() != "```":
                body.append(lines[j])
                j += 1
            if marked == checked:
                cmds, cur = [], ""
                for ln in body:
                    cur += ln.rstrip()
                    if cur.endswith("\\"):
                        cur = cur[:-1] + " "
                        continue
                    if cur.strip():
                        cmds.append(cur.strip())
                    cur = ""
                out.append(cmds)
            i = j
        i += 1
    return out


def test_the_readme_has_checked_blocks_and_its_first_training_command_is_cpu_sized():
    checked = [c for b in _blocks(README, True) for c in b]
    subs = {shlex.split(c, comments=True)[1] for c in checked if c.startswith("mdlm ")}
    assert {"train", "eval", "sample"} <= subs, subs
    first_train = next(ln for ln in README.splitlines() if re.match(r"^\s*(torchrun .*-m )?mdlm train", ln))
    assert "--quick" in first_train and "CPU" in first_train, first_train


def test_commands_outside_the_checked_blocks_name_a_gpu_machine():
    for block in _blocks(README, False):
        for cmd in block:
            if re.match(r"^(mdlm|torchrun|python -m mdlm) ", cmd):
                comment = cmd.split("#", 1)[1] if "#" in cmd else ""
                assert "GPU" in comment, f"README command without a GPU machine in its comment: {cmd}"


def _expand(value: str) -> str:
    return value.replace("$PWD", str(REPO)).replace("${PWD}", str(REPO))


def test_the_checked_readme_commands_run_on_cpu(tmp_path, monkeypatch, capsys):
    from mdlm import cli
    blocks = _blocks(README, True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MDLM_CACHE_DIR", str(tmp_path / "cache"))
    # a user's CPU process: no Triton interpreter (tests/conftest.py sets it for the kernel tests), automatic
    # backends (the compiled CPU twins where an op has one, else PyTorch)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("MDLM_BACKEND", raising=False)
    monkeypatch.delenv("MDLM_DATA_DIR", raising=False)
    ran = []
    for block in blocks:
        for cmd in block:
            argv = shlex.split(cmd, comments=True)
            if argv[0] == "export":
                name, value = argv[1].split("=", 1)
                value = _expand(value)
                if name == "MDLM_DATA_DIR" and not Path(value).is_dir():
                    pytest.skip(f"the README's data folder {value} is not here")
                monkeypatch.setenv(name, value)
                continue
            for a in argv:                                   # files the command names, relative to the checkout
                m = re.match(r"^(?:text:)?([\w./-]+\.(?:md|txt))$", a)
                if m and (REPO / m.group(1)).is_file() and not (tmp_path / m.group(1)).exists():
                    shutil.copy(REPO / m.group(1), tmp_path / m.group(1))
            if argv[0] == "mdlm":
                rc = cli.main(argv[1:] + TINY.get(argv[1], []))
                err = capsys.readouterr().err
                assert rc == 0, f"{cmd}\n{err[-3000:]}"
            elif argv[:2] == ["python", "-c"]:
                exec(compile(argv[2], "<README>", "exec"), {})
            else:
                raise AssertionError(f"a checked README block holds a command this test cannot run: {cmd}")
            ran.append(argv[:2])
    assert ["mdlm", "train"] in ran and ["mdlm", "sample"] in ran and ["mdlm", "eval"] in ran
    # the quick run visibly learns: validation NELBO (EMA weights, fixed draws) falls over its few steps
    vals = [json.loads(x) for x in (tmp_path / "runs" / "quick" / "log.jsonl").read_text().splitlines()
            if "val_nelbo" in x]
    assert [v["step"] for v in vals] == [0, 3, 6]
    assert vals[-1]["val_nelbo"] < vals[0]["val_nelbo"] - 0.5, vals
    assert os.path.isfile(tmp_path / "samples.json") and (tmp_path / "runs" / "quick-hf" / "model.safetensors").is_file()
