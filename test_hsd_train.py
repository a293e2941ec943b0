"""Tests for hsd_train, the toys' training: python -m pytest -q test_hsd_train.py (offline, seconds).

What a user can mistype never destroys data: --make-text and training refuse in one line (exit status 2) before they
write anything. These tests point the text folder (hsd_train.TEXT_DIR) at a temporary one: the shipped toys/text is
never written, and training is replaced by a recorder where only the decision before it is tested.
"""
import ast
import builtins
import hashlib
import os
import re

import pytest
import torch

import hsd_train
import models

HERE = os.path.dirname(os.path.abspath(__file__))


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def one_line_error(capsys):
    """What the run wrote to stderr, asserted to be one line of hsd_train's, without a traceback."""
    err = capsys.readouterr().err
    assert err.startswith("hsd_train: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def text_dir(tmp_path, monkeypatch):
    """A text folder of the toys' layout holding a small old train.txt and heldout.txt, in place of toys/text."""
    folder = tmp_path / "text"
    folder.mkdir()
    (folder / "train.txt").write_text("An old training paragraph.\n", encoding="ascii")
    (folder / "heldout.txt").write_text("An old held-out paragraph.\n", encoding="ascii")
    monkeypatch.setattr(hsd_train, "TEXT_DIR", str(folder))
    return folder


def write_sources(folder, documents, word="tutorial"):
    """Documentation sources as Python's HTML documentation ships them: tutorial/NN.rst.txt, one paragraph each."""
    (folder / "tutorial").mkdir(parents=True)
    for i in range(documents):
        (folder / "tutorial" / f"{i:02}.rst.txt").write_text(f"Heading {i}\n==========\n\nThe {word} paragraph "
                                                             f"number {i}\ngoes on here.\n", encoding="utf-8")
    return folder


def contents(folder):
    return {name: (folder / name).read_text(encoding="ascii") for name in sorted(os.listdir(folder))}


# --- --make-text ----------------------------------------------------------------------------------------------
def test_make_text_refuses_sources_without_documents_and_keeps_the_text(text_dir, tmp_path, capsys):
    """A folder that is not there, an empty one, or one too small to give a held-out document: one line, exit
    status 2, the text as it was (it used to become a single newline, silently)."""
    before = contents(text_dir)
    (tmp_path / "empty").mkdir()
    few = write_sources(tmp_path / "few", 3)                         # every tenth document is held out: none here
    for sources in (tmp_path / "nowhere", tmp_path / "empty", few):
        assert hsd_train.main(["--make-text", str(sources)]) == 2, sources
        err = one_line_error(capsys)
        assert str(sources) in err and ("held-out" in err or "heldout" in err or "_sources" in err), err
        assert contents(text_dir) == before, sources


def test_make_text_writes_both_files_whole_or_leaves_them(text_dir, tmp_path, capsys, monkeypatch):
    """From ten documents: nine train, the tenth is held out, and nothing else is left in the folder. When writing
    fails half-way (a full disk), neither file has changed and no partial file is left behind."""
    assert hsd_train.main(["--make-text", str(write_sources(tmp_path / "docs", 10))]) == 0
    assert "wrote" in capsys.readouterr().out
    written = contents(text_dir)
    assert set(written) == {"train.txt", "heldout.txt"}
    assert written["heldout.txt"] == "Heading 9\nThe tutorial paragraph number 9 goes on here.\n"
    assert written["train.txt"].splitlines()[:2] == ["Heading 0", "The tutorial paragraph number 0 goes on here."]
    assert len(written["train.txt"].splitlines()) == 18

    real_open, opened = builtins.open, []

    def disk_full_on_the_second_file(file, mode="r", *args, **kwargs):
        if "w" in mode and os.path.dirname(os.path.abspath(file)) == str(text_dir):
            opened.append(file)
            if len(opened) == 2:
                raise OSError(28, "No space left on device", file)
        return real_open(file, mode, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", disk_full_on_the_second_file)
    assert hsd_train.main(["--make-text", str(write_sources(tmp_path / "new", 10, word="newer"))]) == 2
    monkeypatch.setattr(builtins, "open", real_open)
    assert "No space left on device" in one_line_error(capsys)
    assert len(opened) == 2 and contents(text_dir) == written


# --- Training: where it writes, and what it trains on ----------------------------------------------------------
def recording_train(calls):
    """In place of hsd_train.train: records where it would write and with how many threads, trains nothing."""
    def train(name, out, seed=0, schedule=hsd_train.SCHEDULE, curve_every=25):
        calls.append((name, out, schedule["steps"], torch.get_num_threads()))
        return {"seconds": 0.0, "heldout": {"bits_per_char": {"full": 8.0}}}
    return train


def test_training_never_replaces_a_shipped_toy_unless_asked_in_words(monkeypatch, capsys):
    """`--model toy-qwen2.5 --steps 2` used to overwrite the shipped toy's weights and log: now one line that says
    how to ask for it, before anything is computed; --out naming the toy's folder, or --force, asks for it."""
    calls, shipped = [], models.TOYS["toy-qwen2.5"]
    before = {name: sha256(os.path.join(shipped, name)) for name in os.listdir(shipped)}
    monkeypatch.setattr(hsd_train, "train", recording_train(calls))
    assert hsd_train.main(["--model", "toy-qwen2.5", "--steps", "2"]) == 2
    err = one_line_error(capsys)
    assert "--force" in err and "--out" in err and os.path.join("toys", "toy-qwen2.5") in err, err
    assert calls == []
    threads = torch.get_num_threads()
    try:
        assert hsd_train.main(["--model", "toy-qwen2.5", "--steps", "3", "--out", shipped]) == 0
        assert hsd_train.main(["--model", "toy-qwen2.5", "--steps", "2", "--force", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert calls == [("toy-qwen2.5", shipped, 3, threads), ("toy-qwen2.5", shipped, 2, 1)]   # --threads 1 ran on 1
    assert {name: sha256(os.path.join(shipped, name)) for name in os.listdir(shipped)} == before


def test_path_errors_and_a_text_too_short_are_one_line(tmp_path, monkeypatch, capsys):
    """--out naming a file (it was a FileExistsError traceback, after the whole training) or a path under one; a
    text emptied or missing (it was a RuntimeError traceback): one line each, exit status 2, no folder made."""
    text = tmp_path / "text"
    text.mkdir()
    monkeypatch.setattr(hsd_train, "TEXT_DIR", str(text))
    with open(os.path.join(HERE, "toys", "text", "heldout.txt"), encoding="ascii") as f:
        heldout = f.read(20_000)                                         # the held-out loss reads 16,384 characters
    (text / "train.txt").write_text(heldout, encoding="ascii")
    (text / "heldout.txt").write_text(heldout, encoding="ascii")
    readme = os.path.join(HERE, "README.md")
    for out, says in ((readme, "is a file"), (os.path.join(readme, "x"), "Not a directory")):
        assert hsd_train.main(["--model", "toy-qwen2.5", "--steps", "1", "--out", out]) == 2
        assert says in one_line_error(capsys)
    out = tmp_path / "out"
    for train_text, heldout_text, says in (("\n", heldout, "train.txt is too short"),
                                           ("\n", "\n", "heldout.txt is too short"),
                                           (None, heldout, "train.txt: No such file")):
        (text / "heldout.txt").write_text(heldout_text, encoding="ascii")
        (text / "train.txt").unlink(missing_ok=True)
        if train_text is not None:
            (text / "train.txt").write_text(train_text, encoding="ascii")
        assert hsd_train.main(["--model", "toy-qwen2.5", "--steps", "1", "--out", str(out)]) == 2
        assert says in one_line_error(capsys)
        assert not out.exists()


def test_threads_must_be_a_positive_number(capsys):
    assert hsd_train.main(["--threads", "0", "--report"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err


def test_every_option_says_what_it_does_and_its_default(capsys, monkeypatch):
    """--help: every option has a help text; every option that takes a value says its default."""
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as stop:
        hsd_train.main(["--help"])
    assert stop.value.code == 0
    entries = re.split(r"\n  (?=-)", capsys.readouterr().out.split("options:\n")[1])[1:]
    names = [entry.split()[0].rstrip(",") for entry in entries]
    assert {"--model", "--out", "--force", "--steps", "--threads", "--make-text"} <= set(names), names
    for entry in entries:
        option, _, text = entry.partition("  ")
        assert text.strip(), f"{option} has no help"
        if len(option.split()) > 1:                                     # --seed SEED: it takes a value
            assert "default" in text, f"{option} does not say its default: {text.strip()}"


# --- The wait policy of OpenMP, set before torch starts it --------------------------------------------------------
def test_waiting_threads_sleep_unless_the_user_says_otherwise():
    """hsd_train sets OMP_WAIT_POLICY=PASSIVE, a default a user's own setting overrides, before it imports torch or
    anything that does (OpenMP reads it once, when torch loads it)."""
    with open(os.path.join(HERE, "hsd_train.py"), encoding="utf-8") as f:
        body = ast.parse(f.read()).body
    sets = [i for i, node in enumerate(body) if isinstance(node, ast.Expr) and ast.unparse(node)
            == "os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')"]
    imports = [i for i, node in enumerate(body) if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
        (alias.name if isinstance(node, ast.Import) else node.module).split(".")[0] in {"torch", "models", "hsd",
                                                                                        "hsd_eval", "huggingface_hub"}
        for alias in node.names)]
    assert sets and imports and sets[0] < min(imports), (sets, imports)


# --- The README installs into a virtual environment -------------------------------------------------------------
def test_the_readme_installs_into_a_virtual_environment():
    """Every pip install of the README's "Two commands" and "Install" comes after a virtual environment is made and
    activated (it used to install into the system's Python, as root)."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for title in ("## Two commands", "### Install"):
        section = readme.split(f"\n{title}\n")[1].split("\n## ")[0].split("\n### ")[0]
        first_pip = section.index("pip install")
        assert -1 < section.find("python3 -m venv .venv") < section.find(". .venv/bin/activate") < first_pip, title
