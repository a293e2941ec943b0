"""Tests for cli.py: python -m pytest -q test_cli.py (offline, no model run). The command lines' arguments and what
hsd.py prints of a generation, each function alone; hsd.py's command line as a whole is tested in test_hsd.py."""
import argparse

import pytest

import cli
import hsd
import models

SKIP_NOTHING = models.Skip()


def test_a_misspelt_option_is_named_with_the_closest_one():
    """The first unknown --option close to a known one; an abbreviation argparse accepts, a word far from every option,
    and anything after -- are no misspelling."""
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--max-new-tokens", type=int)
    assert cli.misspelt_option(p, ["--modle", "x"]) == "unknown option --modle: did you mean --model?"
    assert cli.misspelt_option(p, ["--max-new-tokns=3"]) == ("unknown option --max-new-tokns: did you mean "
                                                             "--max-new-tokens?")
    assert cli.misspelt_option(p, ["--max", "3", "--mod", "x"]) is None                     # argparse's abbreviations
    assert cli.misspelt_option(p, ["--xyzzy"]) is None and cli.misspelt_option(p, ["--", "--modle"]) is None


def test_k_is_a_number_or_auto_and_a_prompt_file_loses_its_last_line_break(tmp_path):
    assert cli.k_argument("auto") == "auto" and cli.k_argument("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match="-k takes a number of drafts or auto, not 'three'"):
        cli.k_argument("three")
    path = tmp_path / "prompt.txt"
    path.write_bytes(b"one\r\ntwo\r\n")
    assert cli.read_prompt(str(path)) == "one\ntwo"                          # its last line break alone
    path.write_bytes(b"\xff")
    with pytest.raises(models.UsageError, match="is not UTF-8 text"):
        cli.read_prompt(str(path))
    with pytest.raises(models.UsageError, match="cannot read --prompt-file"):
        cli.read_prompt(str(tmp_path / "none.txt"))


def test_trace_marks_what_came_after_the_end_of_text():
    tok = models.char_tokenizer()
    eos_inside = hsd.Step("round", [33, 96, 34], 3, 35, [33, 96], 0.0)      # accepted: "A", EOS, "B"; bonus "C"
    line = cli.trace_line(1, eos_inside, tok, color=False)
    assert line.startswith('round   1  accepted 3/3  +"A" +"<|endoftext|>" +"B"  -> bonus "C"')
    assert line.endswith('(not output: "BC" came after the end of text)')
    ordinary = hsd.Step("round", [33, 34], 1, 40, [33, 40], 0.0)
    assert cli.trace_line(2, ordinary, tok, color=False) == 'round   2  accepted 1/2  +"A" -"B"  -> correction "H"'
    assert cli.plain_line(1) == "plain     1 step" and cli.plain_line(12) == "plain    12 steps"


def test_the_acceptance_line_labels_its_histogram_for_any_k():
    tok, steps = models.char_tokenizer(), [hsd.Step("prefill", [], 0, None, [], 0.1)]
    steps += [hsd.Step("round", [1] * 100, a, 2, [1] * a + [2], 0.01) for a in [0] * 14 + [1] * 3 + [100] * 4]
    s = {**hsd.statistics(hsd.Draft("component", SKIP_NOTHING, 100, None), steps), "new_token_ids": [1, 2]}
    lines = list(cli.summary(s, 500, 96, tok))
    alpha = next(line for line in lines if line.startswith("alpha"))
    assert "(rounds by drafts accepted: 0: 14, 1: 3, 100: 4)" in alpha and len(alpha) < 200
    assert lines[0] == "stop    after 2 new tokens (--max-new-tokens)" and lines[-1].startswith("speed   424 tokens in")
