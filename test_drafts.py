"""Tests for drafts.py: draft files (read, written, written by hand), the costs they carry for -k auto, and Skips as
a draft file gives them. In-process, on the tiny models: python -m pytest -q test_drafts.py."""
import json
import pathlib

import pytest
import torch

import drafts
import hsd
import models

PROMPT = models.char_tokenizer().encode("The cat sat on the mat.").ids


@pytest.fixture(scope="module")
def falcon():
    return models.load("tiny-falcon-h1")


def written(folder, spec, name="draft.json", bom=False):
    """spec (a dict, or text as it stands) written to folder/name; its path as a str."""
    path = folder / name
    text = spec if isinstance(spec, str) else json.dumps(spec)
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    return str(path)


def by_hand(**changes):
    """The README's minimal draft file, with changes."""
    return {"format": "hsd-draft/1", "model": {"name": "tiny-falcon-h1"}, "skip": {"attention": [3]}, "k": 3,
            **changes}


def one_line_error(capsys, *args):
    """hsd.py's exit status and its stderr, which must be one line."""
    status = hsd.main(["--model", "tiny-falcon-h1", "--max-new-tokens", "4", *args])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return status, err


def test_a_file_written_by_the_search_reads_back_as_written(tmp_path, falcon):
    """draft_file and write_draft_file (the search's writer) make what read_draft_file reads: the skip, k, stop, and
    found_by's costs; the write leaves no partial file."""
    skip = models.Skip(layers={2}, attention={0, 1}, mlp={5})
    found_by = {"method": "by test", "device": drafts.device_name(falcon.lm_head.weight.device),
                "threads": torch.get_num_threads(), "costs": {"c": 0.6, "v": {"1": 1.2, "2": 1.3}, "context": 64,
                                                               "temperature": 0.0}}
    spec = drafts.draft_file("tiny-falcon-h1", drafts.identity(falcon), skip, "auto", 0.3, found_by)
    path = tmp_path / "found.json"
    drafts.write_draft_file(path, spec)
    assert [p.name for p in tmp_path.iterdir()] == ["found.json"] and json.loads(path.read_text()) == spec
    chosen, notes = drafts.read_draft_file(path, falcon)
    assert (chosen.skip, chosen.k, chosen.stop, chosen.costs, notes) == (skip, "auto", 0.3, (0.6, {1: 1.2, 2: 1.3}),
                                                                         [])


def test_auto_takes_its_costs_from_the_file_or_the_caller(tmp_path, falcon):
    """-k auto pauses below the break-even acceptance of the draft's c and v: the file's found_by.costs, else the
    caller's costs=(c, v) (a dict or a sequence indexed by d), else the default rule (the share of weights read)."""
    costs = {"c": 0.5, "v": {"1": 1.1, "2": 1.2}, "context": 64, "temperature": 0.0}
    path = written(tmp_path, by_hand(k="auto", found_by={"costs": costs}))
    with pytest.warns(UserWarning, match="not checked against an architecture"):      # no "model" block
        _, stats = hsd.generate(falcon, PROMPT, 8, draft=path, eos_token_id=-1)
    assert stats["pause_below"] == pytest.approx(0.6)             # 1 + p = 0.5 + 1.1 at k = 1, the least
    skip = models.Skip(attention={3})
    given = hsd.generate(falcon, PROMPT, 8, draft=skip, k="auto", costs=(0.5, [1.0, 1.1, 1.2]), eos_token_id=-1)
    assert given[1]["pause_below"] == pytest.approx(0.6)          # item d of the sequence is v[d]
    default = hsd.generate(falcon, PROMPT, 8, draft=skip, k="auto", eos_token_id=-1)[1]["pause_below"]
    assert default == pytest.approx(hsd.default_costs(falcon, skip)[0]) and 0.9 < default < 1   # one layer's attention
    with pytest.raises(models.UsageError, match="costs must be"):
        hsd.generate(falcon, PROMPT, 8, draft=skip, k="auto", costs=(0.5, {1: -1}))
    assert hsd.generate(falcon, PROMPT, 8, draft=skip, k=2)[1]["pause_below"] is None


def test_a_file_written_by_hand_from_the_readme_runs_with_a_note(tmp_path, capsys, falcon):
    """Without a "model" block, or with only its name, a file is used for any model whose layers and units it names,
    with a one-line note that it was not checked against an architecture; any file name; a pathlib.Path; a BOM."""
    for spec in (by_hand(), {key: value for key, value in by_hand().items() if key != "model"}):
        for name in ("att2.txt", "ATT2.JSON"):
            path = written(tmp_path, spec, name, bom=name == "att2.txt")
            assert hsd.main(["--model", "tiny-falcon-h1", "--draft", path, "--max-new-tokens", "4"]) == 0
            out, err = capsys.readouterr()
            assert err.count("\n") == 1 and "not checked against an architecture" in err, err
            assert "k=3: skips the attention of layer 3" in out
    with pytest.warns(UserWarning, match="not checked against an architecture"):
        _, stats = hsd.generate(falcon, PROMPT, 4, draft=pathlib.Path(path), eos_token_id=-1)
    assert stats["draft"] == path and stats["k"] == 3


@pytest.mark.parametrize("spec, message", [
    (by_hand(model={"name": "toy-qwen3.5", "family": "qwen3_5"}),
     "is a draft for another architecture (its family differ from this model's; it was written for toy-qwen3.5)"),
    (by_hand(skip={}), "skips nothing: the full model would draft for itself"),
    (by_hand(skip={"layers": [], "mlp": []}), "skips nothing"),
    ({key: value for key, value in by_hand().items() if key != "k"}, '"k" is missing'),
    (by_hand(k=None), '"k" must be a number of drafts (at least 1) or "auto", not null'),
    (by_hand(stop={"confidence": 0}), 'not {"confidence": 0}'),
    ('{"k": ' + "1" * 5000 + "}", "(damaged: Exceeds the limit (4300 digits) for integer string conversion)"),
    ("[" * 100_000 + "]" * 100_000, "(damaged: nested too deeply to read)"),
    (by_hand(found_by={"costs": {"c": -1, "v": {"1": 1.1}}}), '"found_by": "costs" must hold "c": a positive number'),
    ('{"format": "hsd-dr', "(damaged: Unterminated string starting at: line 1 column 12 (char 11))"),
])
def test_a_draft_file_that_cannot_run_is_one_line(tmp_path, capsys, spec, message):
    """What is wrong, in JSON's words, never cut mid-word, never a traceback (a file nested 100,000 deep included),
    and no NAME to fill in."""
    status, err = one_line_error(capsys, "--draft", written(tmp_path, spec))
    assert status == 2 and message in err and "NAME" not in err, err


def test_units_of_a_layer_left_out_whole_and_duplicates_are_named_once(tmp_path, capsys):
    """layers [2] with attention [2, 2, 3]: the attention of layer 2 is left out with the layer; printed once."""
    skip = models.Skip(layers={2}, attention={2, 3})
    assert skip == models.Skip(layers={2}, attention={3}) and str(skip) == "layer 2; the attention of layer 3"
    path = written(tmp_path, by_hand(skip={"layers": [2, 2], "attention": [2, 2, 3]}))
    assert hsd.main(["--model", "tiny-falcon-h1", "--draft", path, "--max-new-tokens", "2"]) == 0
    assert "skips layer 2; the attention of layer 3\n" in capsys.readouterr().out


def test_a_file_searched_with_other_threads_gets_a_note(tmp_path, falcon):
    threads = torch.get_num_threads()
    path = written(tmp_path, by_hand(model={"name": "tiny-falcon-h1", **drafts.identity(falcon)},
                                     found_by={"threads": threads + 1}))
    _, notes = drafts.read_draft_file(path, falcon)
    assert notes == [(f"{path} was searched with {threads + 1} threads, this run uses {threads}: threads change every "
                      "cost, so it may not be the fastest draft here")]
    assert drafts.read_draft_file(written(tmp_path, by_hand(model={"name": "tiny-falcon-h1", **drafts.identity(
        falcon)}, found_by={"threads": threads})), falcon)[1] == []


def test_a_file_used_at_another_temperature_or_context_gets_a_note(tmp_path, falcon, capsys):
    """A draft searched greedy at a context of 96 tokens: at T = 0.6 a note gives its prediction there, at about
    300 tokens a note says costs move with the context; at its own temperature and near its context, none."""
    found_by = {"costs": {"c": 0.6, "v": {"1": 1.2}, "context": 96, "temperature": 0.0},
                "predicted_speedup": {"0": 1.2, "0.6": 1.05}}
    path = written(tmp_path, by_hand(model={"name": "tiny-falcon-h1", **drafts.identity(falcon)}, found_by=found_by))
    assert drafts.read_draft_file(path, falcon, 0.0, 120)[1] == []
    assert drafts.read_draft_file(path, falcon, 0.6, 96)[1] == [
        f"{path} was searched at temperature 0, this run samples at 0.6: its prediction here is 1.05x"]
    assert drafts.read_draft_file(path, falcon, 0.0, 300)[1] == [
        f"{path} was searched at a context of 96 tokens, this run's is about 300: costs move with the context, so it "
        "may not be the fastest draft here"]
    assert hsd.main(["--model", "tiny-falcon-h1", "--draft", path, "--temperature", "0.6", "--seed", "1",
                     "--max-new-tokens", "4"]) == 0
    assert "searched at temperature 0, this run samples at 0.6: its prediction here is 1.05x" in capsys.readouterr().err


def test_a_config_hsd_does_not_run_says_what_is_wrong(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(models.UsageError) as caught:
        models.load(str(tmp_path))
    assert str(caught.value) == (f"{tmp_path}/config.json: model_type 'llama' is not supported: hsd implements "
                                 "falcon_h1, qwen3_5 and qwen2")
