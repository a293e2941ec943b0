"""hsd's course: the exercises, their grading commands, and handouts (EXERCISES.md).

  python exercises.py --exercises [--json]            the catalogue: what each exercise asks, needs, its grading
  python exercises.py --blank NAME[,NAME] --out DIR   a handout: the project with those functions left to write

An exercise's grading tests (its `tests`: names of tests, in whichever of the project's test files defines each) run
its functions and the functions of the exercises it `needs`, and of no other: test_exercises.py proves it by grading
each exercise with every other exercise blanked. So exercises that do not need each other can be handed out together,
and each one is graded on its own. A handout holds the project, its tests and the starter code; this file and
test_exercises.py, the grader's self-check, stay here.
"""
import argparse
import ast
import difflib
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from collections import namedtuple

HERE = os.path.dirname(os.path.abspath(__file__))
INSTRUCTORS = ("exercises.py", "test_exercises.py")     # the course's tools and the grader's self-check: not handed out

Exercise = namedtuple("Exercise", "name functions teaches hint minutes tests needs")
MODEL = ["causal-conv", "mamba-recurrence", "delta-rule-recurrence", "ssd-chunked", "delta-rule-chunked"]
VERIFY = ["mamba-verify-states", "delta-rule-verify-states"]      # the model's forms for a recording (verify) pass
EXERCISES = [
    Exercise(
        "causal-conv", ["models.causal_conv"],
        "the causal depthwise convolution of Mamba-2 and Gated DeltaNet, and why its window (the last K-1 inputs) is "
        "part of the recurrent state that a snapshot must keep and a commit must roll back",
        "put the window before x, then each output is a weighted sum of K consecutive inputs", 20,
        ["test_causal_conv_reads_its_window"], []),
    Exercise(
        "mamba-recurrence", ["models.ssd_step"],
        "Mamba-2's selective state-space recurrence for one token: the definition that decoding runs",
        "decay the old state by exp(dt A), add dt x B^T, read y = s C; make a new tensor, never modify the old one", 20,
        ["test_ssd_recurrence_is_the_definition"], []),
    Exercise(
        "delta-rule-recurrence", ["models.gated_delta_rule_step"],
        "the gated delta rule of Gated DeltaNet for one token: a memory that decays, predicts the value of a key, and "
        "writes the error of that prediction",
        "decay, then predict S'^T k, then add k (beta (v - prediction))^T, then read S^T q", 25,
        ["test_gated_delta_rule_is_the_definition"], []),
    Exercise(
        "ssd-chunked", ["models.ssd_chunked"],
        "(advanced) the chunked SSD algorithm used for prefill: the same recurrence as matrix products within chunks "
        "and a short recurrence across them",
        "four steps: within chunks (segsum decays), each chunk's contribution to the state, the state across chunks, "
        "what each position reads from its chunk's start state", 60,
        ["test_ssd_chunked_equals_recurrent"], ["mamba-recurrence"]),
    Exercise(
        "delta-rule-chunked", ["models.gated_delta_rule_chunked"],
        "(advanced) the chunked (WY) form of the gated delta rule used for prefill",
        "within a chunk solve (I + M) U = beta v and (I + M) W = beta k exp(c); the values written are U - W S0", 60,
        ["test_gated_delta_rule_chunked_equals_recurrent"], ["delta-rule-recurrence"]),
    Exercise(
        "mamba-verify-states", ["models.ssd_states"],
        "(advanced) the state after every token of a verify pass in a few batched operations, whatever k: the "
        "recurrence unrolled (the state-space duality), so that verifying k+1 tokens costs about one step",
        "s_t = exp(a_1 + ... + a_t) s_0 + sum_s exp(a_(s+1) + ... + a_t) dt_s x_s B_s^T; segsum gives the decays", 45,
        ["test_ssd_states_equal_recurrent"], ["mamba-recurrence"]),
    Exercise(
        "delta-rule-verify-states", ["models.gated_delta_rule_states"],
        "(advanced) the gated delta rule's state after every token of a verify pass in a few batched operations: "
        "each write depends on the earlier ones, so the values written solve one triangular system",
        "(I + M) u = beta (v - exp(c) S_0^T k), M below the diagonal; then S_t = exp(c_t) S_0 + sum_j exp(c_t - c_j) "
        "k_j u_j^T", 60,
        ["test_gated_delta_rule_states_equal_recurrent"], ["delta-rule-recurrence"]),
    Exercise(
        "snapshot-restore", ["hsd.snapshot", "hsd.restore"],
        "the snapshot before drafting and the restore after it: drafting must leave no trace, and because no state "
        "tensor is ever written in place, references are a snapshot",
        "remember the length and, per layer, the conv window and the recurrent state; put all three back into the "
        "cache's own layer states", 15,
        ["test_restore_puts_the_snapshot_back"], MODEL),
    Exercise(
        "commit", ["hsd.commit"],
        "keeping the state after n of the k+1 verified tokens: a recurrent state cannot be cropped like a KV cache, so "
        "the verify pass records the state after every position and commit picks one",
        "the cache must hold what feeding only the kept tokens would have left; work out which of the recorded states "
        "and which K-1 of the recorded conv inputs that is from how models.Recorded is laid out", 20,
        ["test_commit_keeps_the_state_after_n_tokens"], MODEL + VERIFY),
    Exercise(
        "accept", ["hsd.accept"],
        "greedy verification: the longest prefix of drafts the full model agrees with, then the full model's own next "
        "token (a correction, or a bonus when every draft was accepted)",
        "verify's docstring says which row of the logits judges which draft; stop at the first disagreement; return "
        "ints", 10,
        ["test_accept_takes_the_longest_agreeing_prefix"], []),
    Exercise(
        "accept-sampled", ["hsd.accept_sampled"],
        "speculative sampling: accept a sampled draft with probability min(1, p/q), replace a rejection by a sample "
        "from the residual max(0, p - q), and the output is distributed exactly as plain sampling from p",
        "p: the full model's probabilities() at the same temperature; one uniform draw per draft; torch.multinomial "
        "takes weights; return ints", 30,
        ["test_speculative_sampling_is_exact_in_distribution"], MODEL),
    Exercise(
        "draft-and-verify", ["hsd.draft", "hsd.verify"],
        "the two model calls of a round: up to k steps of the draft model from the full model's state (greedy, or "
        "sampled at a temperature; ending early when unsure or at the end of text), then one pass of the full model "
        "over the pending token and the drafts, recording every position's state",
        "draft(model, cache, pending, skip, k, temperature, generator, stop, eos) feeds pending, d1 .. d(k-1) with "
        "skip, one token a step: the argmax, or at a temperature a draw with the generator from probabilities(), whose "
        "rows make q; it ends after a draft less probable than stop, or after eos; it returns (a list of ints, q "
        "stacked, or None when greedy); verify(model, cache, pending, drafts) feeds [pending, d1 .. dk] in one "
        "recording pass (record_states=True)", 25,
        ["test_drafts_are_the_draft_models_greedy_tokens"], MODEL + VERIFY),
    Exercise(
        "speculative-round", ["hsd.speculative_round"],
        "one round, step by step: snapshot, draft, restore, verify, judge, commit",
        "seven calls: the six steps in the order of the module docstring, each result passed on, and "
        "expected_accepted beside judge (what -k auto weighs the round by); the round's temperature, generator, stop "
        "and eos are those draft and judge take", 15,
        ["test_a_round_drafts_and_judges_as_it_is_asked", "test_rounds_commit_what_one_by_one_feeding_gives"],
        MODEL + VERIFY + ["snapshot-restore", "draft-and-verify", "accept", "accept-sampled", "commit"]),
    Exercise(
        "lookup", ["hsd.lookup"],
        "prompt lookup, the draft that costs nothing: the tokens that followed an earlier occurrence of the text's "
        "last few tokens, the longest such suffix first; and which occurrences are earlier at all",
        "for each suffix size from the largest down to least: look for it among the tokens before the suffix, the "
        "latest first; the first size found wins; propose what followed it, at most k, up to the end of the tokens; "
        "with an index, its dict says where the latest occurrence ends", 20,
        ["test_lookup_proposes_what_followed_the_longest_earlier_suffix"], []),
    Exercise(
        "text-round", ["hsd.text_round"],
        "judging a deterministic draft (the text's) at a temperature: with a one-hot q, speculative sampling accepts "
        "a proposed token with probability p(d) and after a rejection draws from p with it removed, so the output is "
        "exactly plain sampling's; and why the round needs no snapshot and no restore",
        "three steps of the round (verify, with the skip it is given; judge; commit); what q must be for a draft that "
        "puts all its probability on its token; return ints and the logits", 20,
        ["test_a_text_round_judges_the_text_as_a_one_hot_draft"], ["draft-and-verify", "accept", "accept-sampled",
                                                                    "commit"]),
    Exercise(
        "draft-strategies", ["drafts.draft_skip"],
        "the paper's draft strategies as data: which layers, or which layers' attention branch, the draft leaves out",
        "return models.Skip(layers=...) or models.Skip(attention=...); see the README's table", 15,
        ["test_draft_strategies_skip_what_the_paper_skips"], []),
    Exercise(
        "bootstrap", ["cost_model.bootstrap_ci"],
        "the 95% bootstrap percentile interval of a mean, as the paper reports acceptance",
        "resample the values with replacement, take the mean of each resample, then the 2.5% and 97.5% quantiles", 15,
        ["test_bootstrap_gives_a_95_percent_interval"], []),
    Exercise(
        "break-even", ["cost_model.break_even"],
        "the cost model: from step times at two context lengths, the context from which on self-speculation pays off",
        "the gap (1 + a) t_full - (k t_draft + t_verify + t_round) is linear in the context; find where it crosses 0, "
        "rising", 20,
        ["test_break_even_arithmetic"], []),
    Exercise(
        "perplexity", ["hsd_eval.nll"],
        "a measurement on a trained toy: the negative log-likelihood behind perplexity, for the full model and for a "
        "draft, and the perplexity ratio full -> draft that the paper found to predict a draft's acceptance",
        "hidden states of every position but the last, logits, log_softmax; the target at position t is token t+1", 20,
        ["test_nll_gives_the_toys_recorded_heldout_loss"], []),
]


def exercise_by_name(name):
    found = [e for e in EXERCISES if e.name == name]
    if not found:
        closest = difflib.get_close_matches(name, [e.name for e in EXERCISES], n=1)
        hint = f"did you mean {closest[0]}? " if closest else ""
        raise SystemExit(f"exercises.py: error: no exercise {name!r}: {hint}(python exercises.py --exercises lists "
                         "them)")
    return found[0]


@functools.cache
def files_of_tests(root=HERE):
    """{test function: the test files defining it}, read from the syntax trees of root's test_*.py files (pytest.ini's
    testpaths) but the grader's self-check: a grading test may live in any test file."""
    found = {}
    for name in sorted(os.listdir(root)):
        if name.startswith("test_") and name.endswith(".py") and name not in INSTRUCTORS:
            with open(os.path.join(root, name), encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for node in tree.body:
                if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                    found.setdefault(node.name, []).append(name)
    return found


def pytest_id(test):
    """A grading test's pytest id, its file named: "test_x[case]" -> "test_models.py::test_x[case]"."""
    files = files_of_tests().get(test.split("[")[0], [])
    if len(files) != 1:
        raise ValueError(f"the grading test {test} is defined in {', '.join(files) or 'no test file'}: it must be in "
                         "exactly one")
    return f"{files[0]}::{test}"


def grading_command(exercise):
    """The command that grades an exercise, run from the project's (or the handout's) root: just its tests, each failure
    as its message and a short traceback."""
    return "python -m pytest -q --tb=short --assert=plain " + " ".join(f"'{pytest_id(t)}'" for t in exercise.tests)


def together(a, b):
    """Whether exercises a and b can be handed out at once: the grading of neither runs the other's functions."""
    return a.name not in b.needs and b.name not in a.needs


# --- Functions found by their syntax tree, their bodies spliced as text --------------------------------------------
def function_node(tree, qualname):
    """The ast node of the function "f" or "Class.f" in a module's tree."""
    scope = tree.body
    for part in qualname.split("."):
        node = next(n for n in scope if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part)
        scope = node.body
    return node


def body_statements(node):
    """A function's statements after its docstring."""
    has_docstring = isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    return node.body[1:] if has_docstring else node.body


def source_lines(source):
    """source's lines with their ends, numbered as ast numbers them (str.splitlines would split at a form feed too)."""
    return re.findall(r"[^\n]*\n|[^\n]+$", source)


def splice(source, first, last, indent, code):
    """source with its lines first..last (1-based, inclusive) replaced by code, indented by indent spaces."""
    lines = source_lines(source)
    new = textwrap.indent(textwrap.dedent(code).strip("\n") or "pass", " " * indent) + "\n"
    return "".join(lines[:first - 1] + [new] + lines[last:])


def replace_bodies(source, bodies):
    """source with the body of each function in bodies ({qualname: code}) replaced by its code, docstrings kept."""
    tree, spans = ast.parse(source), []
    for qualname, code in bodies.items():
        statements = body_statements(function_node(tree, qualname))
        spans.append((statements[0].lineno, statements[-1].end_lineno, statements[0].col_offset, code))
    for first, last, indent, code in sorted(spans, reverse=True):     # bottom up: the lines above keep their numbers
        source = splice(source, first, last, indent, code)
    return source


def filled(texts, bodies):
    """texts with the given functions' bodies written in: {"module.function": body}."""
    texts, modules = dict(texts), {}
    for function, body in bodies.items():
        module, qualname = function.split(".", 1)
        modules.setdefault(module + ".py", {})[qualname] = body
    for file, module_bodies in modules.items():
        texts[file] = replace_bodies(texts[file], module_bodies)
    return texts


def reference_body(source, qualname):
    """The text of qualname's body after its docstring, dedented: what a student writes."""
    statements = body_statements(function_node(ast.parse(source), qualname))
    lines = source_lines(source)[statements[0].lineno - 1:statements[-1].end_lineno]
    return textwrap.dedent("".join(lines))


def starter(exercise, qualname):
    return f'raise NotImplementedError("exercise {exercise}: write {qualname}, see its docstring and EXERCISES.md")'


# --- Handouts: the project minus the answers and the grader's machinery --------------------------------------------
TEXT_FILES = (".py", ".md")       # what a handout may change; every other file is copied byte for byte
REVEALS = re.compile(r"<!-- shows the reference of ([\w., ]+) -->\n.*?<!-- end -->\n", re.S)
INSTRUCTORS_PART = re.compile(r"<!-- the instructor's -->\n.*?<!-- end -->\n", re.S)     # EXERCISES.md's
INSTRUCTORS_LINE = re.compile(r"^.*<!-- not in handouts -->\n", re.M)     # README's line naming the instructor's tools
THIS_HANDOUT = "<!-- this handout -->\n"                          # EXERCISES.md: where a handout lists its exercises


def project_files(root):
    """The project's files, relative to root: those git tracks (never an untracked file, which may be anyone's:
    solutions/hsd.py), or where there is no git (a handout), every file but caches and environments; never a copy of
    the project inside it (a handout written there, which holds the answers its own exercises left in)."""
    def a_copy(folder):
        return os.path.isfile(os.path.join(root, folder, "test_hsd.py"))
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "-z"], cwd=root, capture_output=True, text=True)
    except FileNotFoundError:                                        # no git on this machine
        listed = None
    if listed is not None and listed.returncode == 0 and os.path.exists(os.path.join(root, ".git")):
        return sorted(name for name in listed.stdout.split("\0") if name and os.path.isfile(os.path.join(root, name))
                      and not ("/" in name and a_copy(name.split("/")[0])))
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in (".git", ".venv", "__pycache__", ".pytest_cache")
                   and not a_copy(os.path.relpath(os.path.join(folder, d), root))]
        files += [os.path.relpath(os.path.join(folder, name), root) for name in names]
    return sorted(files)


def handout_files(root):
    """The files a handout holds: the project's, but the instructor's tools."""
    return [name for name in project_files(root) if name not in INSTRUCTORS]


def project_texts(root):
    """{file: text} of the project's .py and .md files."""
    texts = {}
    for name in project_files(root):
        if name.endswith(TEXT_FILES):
            with open(os.path.join(root, name), encoding="utf-8") as f:
                texts[name] = f.read()
    return texts


def this_handout(exercises):
    """EXERCISES.md's section on what a handout asks: each exercise, its functions and its grading command."""
    lines = ["## This handout", "", textwrap.fill(
        "Write the functions below: each keeps its signature and its docstring, which states the task, and its body "
        "is `raise NotImplementedError`. Grade an exercise with its command, from this folder; until a function is "
        "written, the other tests that run it fail too, and once every grading passes, `python -m pytest -q` here "
        "passes.", 117), ""]
    for e in exercises:
        lines += [textwrap.fill(f"- `{e.name}` (about {e.minutes} min): write "
                                f"{', '.join(f'`{f}`' for f in e.functions)}. It teaches {e.teaches}.", 117,
                                subsequent_indent="  ", break_on_hyphens=False),
                  f"  Grade it: `{grading_command(e)}`"]
    return "\n".join(lines) + "\n\n"


def handout_texts(texts, exercises):
    """The handout's .py and .md files: each exercise's functions with a starter body; the parts of README.md and
    EXERCISES.md that show a blanked function's reference left out; in EXERCISES.md the instructor's parts left out
    and this handout's exercises listed. The instructor's tools (exercises.py, test_exercises.py) are no part of it;
    every other text is the project's as it is."""
    blanked = [f for e in exercises for f in e.functions]
    texts = filled({name: text for name, text in texts.items() if name not in INSTRUCTORS},
                   {f: starter(e.name, f.split(".", 1)[1]) for e in exercises for f in e.functions})

    def leave_out(part):
        shown = [f.strip() for f in part.group(1).split(",") if f.strip() in blanked]
        if not shown:
            return part.group(0)
        return f"*(Left out of this handout: this part shows the reference of {', '.join(shown)}, which you write.)*\n"
    for name in ("README.md", "EXERCISES.md"):
        if name in texts:
            texts[name] = INSTRUCTORS_LINE.sub("", INSTRUCTORS_PART.sub("", REVEALS.sub(leave_out, texts[name])))
    if "EXERCISES.md" in texts:
        texts["EXERCISES.md"] = texts["EXERCISES.md"].replace(
            THIS_HANDOUT, this_handout(exercises) if exercises else "")
    return texts


def write_project(out, texts, root, link=False):
    """A handout of the project at root in the folder out: its files but the instructor's, the texts as given, every
    other file copied byte for byte (or, for the grader's scratch copies, linked)."""
    for name in handout_files(root):
        target = os.path.join(out, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if name in texts:
            with open(target, "w", encoding="utf-8") as f:
                f.write(texts[name])
        elif link:
            os.symlink(os.path.join(root, name), target)
        else:
            shutil.copyfile(os.path.join(root, name), target)
            shutil.copymode(os.path.join(root, name), target)


def inside_the_project(out):
    """Whether out lies inside this project's git work tree and git does not ignore it (a handout there would show in
    `git status`, and `git add -A` would commit it)."""
    path = os.path.abspath(out)
    if os.path.commonpath([HERE, path]) != HERE or not os.path.exists(os.path.join(HERE, ".git")):
        return False
    try:
        ignored = subprocess.run(["git", "check-ignore", "-q", os.path.relpath(path, HERE)], cwd=HERE,
                                 capture_output=True).returncode == 0
    except FileNotFoundError:                                        # no git on this machine
        return False
    return not ignored


def blank(names, out):
    """python exercises.py --blank NAME[,NAME] --out DIR: the handout, or one line saying why not."""
    exercises = [exercise_by_name(name) for name in names]
    for a in exercises:
        for b in exercises:
            if b.name in a.needs:
                raise SystemExit(f"exercises.py: error: {a.name}'s grading runs {', '.join(b.functions)} ({b.name}): "
                                 f"hand out {b.name} first, then {a.name} (python exercises.py --exercises says which "
                                 "go together)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"exercises.py: error: {out} is a file: give a new folder to --out")
    if os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"exercises.py: error: {out} is not empty: give a new folder to --out")
    if inside_the_project(out):
        folder = os.path.basename(os.path.abspath(out))
        raise SystemExit(f"exercises.py: error: {out} lies inside the project, whose git would take the handout for "
                         f"changes of its own: give a folder outside it (../{folder}) or one git ignores")
    texts = handout_texts(project_texts(HERE), exercises)
    partial = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(os.path.abspath(out))}.partial")
    try:                                     # written beside it, then renamed: an interrupted run leaves no half
        shutil.rmtree(partial, ignore_errors=True)
        write_project(partial, texts, HERE)
        if os.path.isdir(out):
            os.rmdir(out)                                            # empty, checked above
        os.rename(partial, out)
    except OSError as e:
        raise SystemExit(f"exercises.py: error: cannot write the handout to {out}: {e.strerror or e}")
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    for exercise in exercises:
        print(f"{exercise.name}: write {', '.join(exercise.functions)} in {out}, then grade it there with\n"
              f"    {grading_command(exercise)}")
    print(f"Once they pass, `python -m pytest -q` in {out} runs the whole suite there, and "
          "`python hsd.py --model toy-falcon-h1 --trace --check` decodes with the functions written.")


# --- The command line ----------------------------------------------------------------------------------------------
def describe_exercises():
    """The catalogue as --exercises --json prints it."""
    return [{"name": e.name, "functions": e.functions, "grade": grading_command(e), "teaches": e.teaches,
             "hint": e.hint, "minutes": e.minutes, "needs": e.needs,
             "together_with": [o.name for o in EXERCISES if o is not e and together(e, o)]} for e in EXERCISES]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="exercises.py", description="hsd's course: exercises and handouts "
                                                                      "(EXERCISES.md).")
    parser.error = lambda message: parser.exit(2, f"exercises.py: error: {message} (see --help)\n")
    parser.add_argument("--exercises", action="store_true", help="list the exercises: what each needs, its grading")
    parser.add_argument("--json", action="store_true", help="with --exercises: as one JSON list")
    parser.add_argument("--blank", help="NAME[,NAME]: write a handout with these exercises' functions left to write")
    parser.add_argument("--out", help="with --blank: a new folder for the handout")
    a = parser.parse_args(argv)
    if a.exercises and (a.blank or a.out):
        parser.error("--exercises lists the catalogue, --blank writes a handout: give one of them")
    try:
        if a.exercises and a.json:
            print(json.dumps(describe_exercises()))
        elif a.exercises:
            for e in describe_exercises():
                print(f"{e['name']} (about {e['minutes']} min): {', '.join(e['functions'])}\n    {e['teaches']}")
                print(f"    its grading runs the functions of: {', '.join(e['needs']) or 'no other exercise'}")
                print(f"    can be handed out with: {', '.join(e['together_with'])}\n    {e['grade']}")
        elif a.blank and a.out:
            blank([name.strip() for name in a.blank.split(",")], a.out)
        else:
            parser.error("give --exercises, or --blank NAME[,NAME] --out DIR")
    except SystemExit as e:
        if isinstance(e.code, str):                                  # one line saying what to do
            print(e.code, file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("\nexercises.py: interrupted (nothing was written)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)         # output piped into `head` and the like: stop quietly
    sys.exit(main())
