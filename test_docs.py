"""Tests of the project as its users meet it: python -m pytest -q test_docs.py (offline). The modules import one way,
the project stands alone, every link of every document resolves, and the README's examples print what it shows."""
import ast
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------------------------------------
# The project as software: imports one way, stands alone, a licence, the README's examples run

# The rule of the project's imports, from the bottom up: what each module may import of the project. models is at the
# bottom; what a draft is (drafts) and the cost model (cost_model) stand on it and import no tool, nor hsd; cli (the
# command lines' arguments and printing) stands on the three and is no tool; hsd stands on the four; the tools stand on
# all five and never on one another. conflayers (a baseline's selection rule, which the search runs) stands on hsd and
# models and is no tool: hsd_search imports it.
CORE = {"models", "cost_model", "drafts"}
TOOLS = {"hsd_eval", "hsd_bench", "hsd_train", "hsd_search", "exercises"}
MAY_IMPORT = {"models": set(), "cost_model": {"models", "drafts"}, "drafts": {"models"}, "cli": CORE,
              "hsd": CORE | {"cli"}, "conflayers": {"models", "hsd"}, **{tool: CORE | {"cli", "hsd"} for tool in TOOLS}}
MAY_IMPORT["hsd_search"] = MAY_IMPORT["hsd_search"] | {"conflayers"}
ORACLE = "transformers"                  # a test-only oracle; hsd_bench compares with it, importing it where it does

NOT_YET = set()          # imports that break the rule while work under way removes them: (importer, imported)


def imports_of(path):
    """{module: whether at the top of the file} of every import in a file: statements at any depth (inside functions
    too) and importlib.import_module / __import__ / pytest.importorskip called with a name."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    top = {id(node) for node in tree.body}
    found = {}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and ast.unparse(node.func) in ("importlib.import_module", "__import__", "pytest.importorskip")):
            names = [node.args[0].value]
        for name in names:
            found[name.split(".")[0]] = found.get(name.split(".")[0], False) or id(node) in top
    return found


def broken_rules(module, imports, modules):
    """How module's imports ({name: at the top of its file}) break the rule: a pair (module, what it may not import),
    or a sentence; modules: the project's."""
    mine, said = set(imports) & modules - {module}, []
    if module == "conftest":
        said += [f"conftest imports {name}: it sets up pytest, and imports nothing of the project" for name in mine]
    elif module.startswith("test_"):
        tested = module[len("test_"):]
        if tested in modules and tested not in mine:
            said.append(f"{module} does not import {tested}, which it tests")
        said += [f"{module} imports {name}, which handouts leave out" for name in mine & {"exercises", "test_exercises"}
                 if module != "test_exercises"]
        said += [f"{module} imports the test file {name}: each test file holds its own helpers" for name in mine
                 if name.startswith("test_")]
    elif module in MAY_IMPORT:
        said += [(module, name) for name in sorted(mine - MAY_IMPORT[module])]
        if ORACLE in imports and module != "hsd_bench":
            said.append(f"{module} imports {ORACLE}, a test-only oracle")
        if imports.get(ORACLE) and module == "hsd_bench":
            said.append(f"hsd_bench imports {ORACLE} at the top of the file: import it in the functions that compare "
                        "with it, so that the rest of the benchmark runs without it")
    else:
        said.append(f"{module}.py has no place in the rule of imports (test_docs.py): of the core, hsd, or a tool?")
    return said


def test_imports_run_one_way():
    """Every .py file at the top of the project follows the rule above, imports inside functions too: models at the
    bottom; cost_model and drafts import no tool, nor hsd; cli only those three, hsd those and cli; no tool (hsd_eval,
    hsd_bench, hsd_train, hsd_search, exercises) imports another; the runtime never imports transformers but hsd_bench,
    inside the functions that compare with it; a test file imports what it tests, no other test file, and nothing a
    handout leaves out."""
    files = sorted(name for name in project_files() if name.endswith(".py") and os.sep not in name and "/" not in name
                   and (tracked() is not None or name[:-3] in KNOWN))      # never a script of the user's lying here
    modules = {name[:-3] for name in files}
    assert {"models", "hsd"} <= modules
    broken = [said for name in files for said in broken_rules(name[:-3], imports_of(os.path.join(HERE, name)), modules)]
    pairs = {said for said in broken if isinstance(said, tuple)}
    sentences = [said for said in broken if isinstance(said, str)]
    assert not sentences, "\n".join(sentences)
    assert pairs - NOT_YET == set(), f"imports of one tool by another, or against the rule: {sorted(pairs - NOT_YET)}"
    gone = {pair for pair in NOT_YET if pair[0] in modules} - pairs
    assert not gone, f"{sorted(gone)} no longer break the rule: delete them from NOT_YET"


# Without git (a handout), the project's modules are those the rule names and their test files, not every .py lying here
KNOWN = {*MAY_IMPORT, "conftest", "test_docs", "test_exercises", *(f"test_{module}" for module in MAY_IMPORT)}


def tracked():
    """The files git tracks, relative to HERE, or None where there is no git (a handout)."""
    listed = subprocess.run(["git", "ls-files", "--cached"], cwd=HERE, capture_output=True,
                            text=True) if shutil.which("git") else None
    if listed is not None and listed.returncode == 0 and os.path.exists(os.path.join(HERE, ".git")):
        return [name for name in listed.stdout.splitlines() if os.path.isfile(os.path.join(HERE, name))]
    return None


def project_files():
    """The project's files, relative to HERE: those git tracks (never a file of the user's lying in the folder:
    my_example.py); without git (a handout), every file but git's, caches, virtual environments and a handout written
    inside the project."""
    if tracked() is not None:
        return tracked()
    files = []
    for folder, dirs, names in os.walk(HERE):
        dirs[:] = [d for d in dirs if d not in (".git", "__pycache__", ".pytest_cache") and not any(
            os.path.exists(os.path.join(folder, d, mark)) for mark in ("pyvenv.cfg", "test_hsd.py"))]
        files += [os.path.relpath(os.path.join(folder, name), HERE) for name in names]
    return files


def test_the_project_stands_alone():
    """Nothing points at the project's notes beside it (a user's clone has only the project); MIT licence, as the
    README says."""
    for name in project_files():
        if name.endswith((".py", ".md", ".txt", ".json", "run")) and not name.startswith("toys/text/"):
            with open(os.path.join(HERE, name), encoding="utf-8") as f:
                assert "../" + "shared" not in f.read(), name
    with open(os.path.join(HERE, "LICENSE"), encoding="utf-8") as f:
        assert f.read().startswith("MIT License")
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        assert "MIT licence" in f.read()


def test_every_link_and_picture_of_every_document_resolves():
    """Each document's relative links and pictures name a file that exists, from where the document stands, and a
    heading of it where they name one (GitHub's anchors: lower case, spaces as hyphens, other punctuation left out)."""
    def anchors(text):
        return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
                for line in text.splitlines() if line.startswith("#")}
    documents = [name for name in project_files() if name.endswith(".md")]
    assert {"README.md", "RESULTS.md", "EXERCISES.md", os.path.join("toys", "README.md")} <= set(documents)
    for name in documents:
        with open(os.path.join(HERE, name), encoding="utf-8") as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"\w+:", target):                         # a web address
                continue
            file, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(HERE, os.path.dirname(name), file)) if file else os.path.join(HERE,
                                                                                                                 name)
            assert os.path.isfile(path), f"{name} links {target}, which is not there"
            if anchor:
                with open(path, encoding="utf-8") as f:
                    assert anchor in anchors(f.read()), f"{name} links {target}: no such heading"


def readme_section(title):
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    return readme.split(f"\n## {title}\n")[1].split("\n## ")[0] if f"\n## {title}\n" in readme else None


def test_the_readme_python_example_runs():
    """The README's Python API example, as it stands there, runs and prints what the README shows under it."""
    section = readme_section("Python API")
    code, shown = section.split("```python\n")[1].split("```")[0], section.split("```text\n")[1].split("```")[0]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == shown.strip()


def test_the_readme_debugger_session_prints_what_the_readme_says():
    """The README's pdb session, fed to python -m pdb line by line: every value and current line it shows is printed
    by pdb after the same command (paths and line numbers, which it leaves out, are not compared)."""
    section = readme_section("Stepping through a round in a debugger")
    if "```" not in (section or ""):
        pytest.skip("this handout's README leaves the session out (it shows the reference of a function to write)")
    block = section.split("```")[1].strip().splitlines()
    assert block[0].startswith("$ python -m pdb hsd.py")
    commands, shown = [], []                                   # shown[i]: the lines the README shows after command i
    for line in block[1:]:
        if line.startswith("(Pdb) "):
            commands.append(line[len("(Pdb) "):])
            shown.append([])
        else:
            shown[-1].append(line)
    session = subprocess.run([sys.executable, *shlex.split(block[0])[2:]], input="\n".join(commands) + "\n",
                             capture_output=True, text=True, cwd=HERE, timeout=120)
    printed = session.stdout.split("(Pdb) ")[1:]                # printed[i]: what pdb printed after command i
    assert len(printed) == len(commands), session.stdout[-2000:]
    for command, expected, output in zip(commands, shown, printed):
        lines = output.splitlines()
        for line in expected:
            if line.startswith("-> "):                         # the line pdb stopped at, its comment left out
                at = [x.split("#")[0].strip() for x in lines if x.startswith("-> ")]
                assert at == [line.split("#")[0].strip()], f"after {command!r} pdb stopped at {at}, the README: {line}"
            else:
                assert line in lines, f"after {command!r} pdb printed {lines}, the README: {line}"


def test_the_readme_installs_into_a_virtual_environment():
    """Every pip install of the README's "Two commands" and "Install" comes after a virtual environment is made and
    activated (it used to install into the system's Python, as root)."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for title in ("## Two commands", "### Install"):
        section = readme.split(f"\n{title}\n")[1].split("\n## ")[0].split("\n### ")[0]
        first_pip = section.index("pip install")
        assert -1 < section.find("python3 -m venv .venv") < section.find(". .venv/bin/activate") < first_pip, title


def test_the_readmes_what_you_see_is_what_the_command_prints():
    """The README's "What you see": the command it shows prints those lines, numbers aside (timings vary; the
    rounds, the text and every kind of line, the plain step among them, do not)."""
    block = readme_section("What you see").split("```")[1].strip().splitlines()
    assert block[0].startswith("$ python hsd.py") and len(block) > 5
    command = shlex.split(block[0][2:].split("#")[0])
    result = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, cwd=HERE, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    numbers_aside = lambda line: re.sub(r"\d+(?:\.\d+)?", "N", line)
    assert [numbers_aside(line) for line in result.stdout.splitlines()] == [numbers_aside(line) for line in block[1:]]
    assert any(line.startswith("plain ") for line in block) and "`plain N steps`" in readme_section("What you see")


def test_the_readmes_advice_for_stepping_into_the_model_works_at_a_fresh_prompt():
    """The README's advice, fed to pdb: a breakpoint in models set after the first stop in the round stops next in the
    round's draft; set after `import models` at a fresh prompt, it stops first in cost_model.warm_up."""
    section = " ".join(readme_section("Stepping through a round in a debugger").split())
    assert "`break speculative_round`, `continue`), then `break models.Model.hidden_states`" in section
    assert "after `import models` at a fresh prompt, they stop first in `cost_model.warm_up`" in section
    command = [sys.executable, "-m", "pdb", "hsd.py", "--model", "tiny-qwen3.5", "-k", "3", "--max-new-tokens", "4"]
    for commands, caller in ((["break speculative_round", "continue", "break models.Model.hidden_states", "continue"],
                              "draft()"), (["import models", "break models.Model.hidden_states", "continue"],
                                           "warm_up()")):
        session = subprocess.run(command, input="\n".join([*commands, "where", "quit"]) + "\n", capture_output=True,
                                 text=True, cwd=HERE, timeout=120)
        stack = session.stdout.split("(Pdb) ")[-2]                                 # what `where` printed
        assert "hidden_states()" in stack.splitlines()[-2] and caller in stack, session.stdout[-3000:]
        assert "not a function or was not found" not in session.stdout


def test_the_readme_stays_a_starting_point():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 300


def test_a_script_of_the_users_own_in_the_folder_breaks_no_rule():
    """The README's API example saved as my_example.py in the folder, as a user runs it from there: the rule of imports
    is about the project's modules (git's, or without git the ones it names), not whatever .py lies here."""
    path = os.path.join(HERE, "my_example_of_a_user.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write("import hsd\nimport models\n")
    try:
        assert "my_example_of_a_user.py" not in project_files()
        test_imports_run_one_way()
    finally:
        os.remove(path)
