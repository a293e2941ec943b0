"""Tests for hsd_train.py and the trained toys it made: python -m pytest -q test_hsd_train.py (offline): what they
were trained on, that they load as recorded, that they are worth looking at; and that what a user can mistype never
destroys data: --make-text and training refuse in one line (exit status 2) before they write anything. Those tests
point the text folder (hsd_train.TEXT_DIR) at a temporary one: the shipped toys/text is never written, and training
is replaced by a recorder where only the decision before it is tested.
"""
import builtins
import hashlib
import json
import os
import re
import signal

import pytest
import torch

import cost_model
import hsd
import hsd_train
import models

HERE = os.path.dirname(os.path.abspath(__file__))


def rel_err(a, b):
    """Relative RMS error of a against the reference b."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ----------------------------------------------------------------------------------------------------------
# The trained toy models: what they were trained on, that they load as recorded, that they are worth looking at

TOYS = list(models.TOYS)


def training_log(name):
    with open(os.path.join(models.TOYS[name], "training-log.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", TOYS)
def test_the_toys_load_and_give_their_recorded_heldout_loss(name):
    """Each shipped toy, loaded like an official checkpoint, gives the held-out loss its training log recorded (on the
    first 4 of its 32 windows, as the log records it beside the whole: a test of seconds, not of a minute)."""
    log, model = training_log(name), models.load(name)
    windows = hsd_train.heldout_windows()[:hsd_train.FIRST_WINDOWS]
    bits = hsd_train.heldout_bits_per_char(model, windows)
    assert abs(bits - log["heldout"]["first_4_windows"]["full"]) < 1e-4 * bits, (bits, log["heldout"])
    assert log["parameters"] == sum(p.numel() for p in model.parameters())
    assert {"seed", "threads", "torch", "schedule", "characters", "curve"} <= set(log) and log["curve"]["rows"]


def test_the_toys_share_one_budget():
    """The same hidden size, layers, tokenizer, text, characters, seed and schedule; parameters within 10%."""
    logs = {name: training_log(name) for name in TOYS}
    configs = {name: models.load(name).config for name in TOYS}
    counts = [log["parameters"] for log in logs.values()]
    assert max(counts) < 1.1 * min(counts)
    for field in ("seed", "schedule", "characters", "text_sha256"):
        assert len({json.dumps(log[field], sort_keys=True) for log in logs.values()}) == 1, field
    assert len({(config.hidden_size, config.num_layers, config.vocab_size) for config in configs.values()}) == 1
    assert configs["toy-qwen3.5"].layer_types == ("linear_attention",) * 3 + ("full_attention",) + (
        "linear_attention",) * 3 + ("full_attention",)                       # 3 Gated DeltaNet layers per attention
    for name in TOYS:
        assert models.load_tokenizer(name).to_str() == models.char_tokenizer().to_str()


def test_the_training_text_is_what_the_readme_says():
    """The text's sha256 (toys/README.md) and its size; the held-out part is not in the training part."""
    with open(os.path.join(HERE, "toys", "README.md"), encoding="utf-8") as f:
        readme = f.read()
    paragraphs = {}
    for split in ("train", "heldout"):
        text = hsd_train.read_text(split)
        assert hashlib.sha256(text.encode()).hexdigest() in readme, split
        paragraphs[split] = {line for line in text.splitlines() if len(line) > 200}
    assert len(hsd_train.read_text("train")) + len(hsd_train.read_text("heldout")) <= 2_000_000
    assert not paragraphs["train"] & paragraphs["heldout"]
    weights = sum(os.path.getsize(os.path.join(folder, "model.safetensors")) for folder in models.TOYS.values())
    assert weights <= 10_000_000, f"the shipped weights take {weights} bytes"


def test_a_short_training_run_lowers_the_loss_and_resumes_exactly(tmp_path, monkeypatch):
    """A few steps of the real loop on a short schedule lower the held-out loss; interrupted (Ctrl-C) and run again,
    the run ends with the same weights as one that was never interrupted."""
    schedule = {**hsd_train.SCHEDULE, "steps": 12, "warmup": 2, "batch_size": 4, "length": 64}
    monkeypatch.setattr(hsd_train, "HELDOUT_WINDOWS", 4)                  # the log's held-out losses: 4 windows, not 32,
    monkeypatch.setattr(hsd_train, "FIRST_WINDOWS", 2)                    # and 2 (the curve's too), not 4
    monkeypatch.setattr(cost_model, "COPY_PASSAGES", 2)                   # the copying probe: 2 passages, not 16
    monkeypatch.setattr(hsd_train, "LOOP_CHARACTERS", 40)                 # the loop share: 40 characters, not 300
    log = hsd_train.train("toy-qwen2.5", str(tmp_path / "whole"), 0, schedule, curve_every=4)
    curve = log["curve"]["rows"]
    assert curve[-1][2] < curve[0][2] - 0.2, curve                 # held-out bits per character fall
    assert log["copying"]["passages"] == len(log["copying"]["matched"]) == 2 and log["copying"]["given"] == 35
    assert log["copying"]["share"] == sum(log["copying"]["matched"]) / 330
    assert log["loop_share"]["characters"] == 40 and 0 <= log["loop_share"]["share"] <= 1
    real, calls = hsd_train.loss_of, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            signal.raise_signal(signal.SIGINT)                 # Ctrl-C in the middle of a step
        return real(*args, **kwargs)
    monkeypatch.setattr(hsd_train, "loss_of", interrupted)
    with pytest.raises(KeyboardInterrupt, match="run the same command again to resume"):
        hsd_train.train("toy-qwen2.5", str(tmp_path / "resumed"), 0, schedule, curve_every=4)
    monkeypatch.setattr(hsd_train, "loss_of", real)
    hsd_train.train("toy-qwen2.5", str(tmp_path / "resumed"), 0, schedule, curve_every=4)
    whole, resumed = models.load(str(tmp_path / "whole")), models.load(str(tmp_path / "resumed"))
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters()))
    assert not os.path.exists(tmp_path / "resumed" / "resume.pt")


@pytest.mark.parametrize("name", TOYS)
def test_the_toys_give_the_same_logits_in_transformers(name):
    tf = pytest.importorskip("transformers")
    hf = tf.AutoModelForCausalLM.from_pretrained(models.TOYS[name], dtype=torch.float32).eval()
    model = models.load(name)
    ids = hsd_train.heldout_windows()[:1, :70]
    with torch.no_grad():
        expected = hf(ids).logits
    assert rel_err(model(ids), expected) < 1e-4
    cache = models.Cache(model, max_len=70)
    assert rel_err(torch.cat([model(ids[:, t:t + 1], cache) for t in range(70)], dim=1), expected) < 1e-4


def test_the_falcon_toy_writes_words_and_the_random_tiny_model_does_not():
    """The README's figures: of the whitespace-separated words of a 300-character continuation of the README's prompt,
    at least 80% occur in the training text, greedy and at T=0.6, where there are at least ten different ones (greedy
    decoding of so small a model loops: toys/README.md); a random tiny model's hardly any."""
    vocabulary, tok = set(hsd_train.words(hsd_train.read_text("train"))), models.char_tokenizer()
    for temperature in (0.0, 0.6):
        text = hsd_train.continuation(models.load("toy-falcon-h1"), tok, hsd_train.README_PROMPT, 300, temperature)
        rate, different = hsd_train.word_rate(text, vocabulary)
        assert rate >= 0.8 and (temperature == 0 or different >= 10), (temperature, rate, different, text)
    rate, _ = hsd_train.word_rate(hsd_train.continuation(models.load("tiny-falcon-h1"), tok, hsd_train.README_PROMPT,
                                                         300), vocabulary)
    assert rate < 0.2


def test_word_rate_counts_words_as_the_readme_says():
    vocabulary = set(hsd_train.words("The function returns a value. It returns None, or a list."))
    assert hsd_train.word_rate("The function returns (a list), zzq None ", vocabulary) == (6 / 7, 7)
    assert hsd_train.word_rate("returns returns retu", vocabulary) == (1.0, 1)      # the cut last word is left out



def test_loop_share_counts_strings_seen_at_an_earlier_start():
    assert hsd_train.loop_share("abcabcabc", size=3) == 4 / 7          # abc bca cab, then abc bca cab abc again
    assert hsd_train.loop_share("aaaa", size=2) == 2 / 3                # overlapping occurrences count
    assert hsd_train.loop_share("abcdefgh", size=3) == 0.0 and hsd_train.loop_share("abc", size=4) == 0.0
    assert hsd_train.loop_share("x" * 300) == 284 / 285 and hsd_train.LOOP_SIZE == 16


class Predicts(torch.nn.Module):
    """A hand-made model: at position t, the logits of a one-hot on rule(ids, t)."""

    def __init__(self, rule):
        super().__init__()
        self.rule = rule

    def forward(self, ids):
        return torch.nn.functional.one_hot(torch.tensor([[self.rule(ids[0], t) for t in range(ids.shape[1])]]),
                                           97).float()                                      # (1, T, V)


def test_copying_counts_the_characters_before_the_first_difference():
    """A model that reads back what came one passage and a newline earlier copies all; one that always writes "a"
    copies the continuation's leading a's; the share is of summed characters."""
    tok = models.char_tokenizer()
    a = tok.token_to_id("a")
    pairs = [("xyz\nx", "yz"), ("aab\na", "ab"), ("aaaab\naa", "aab")]
    newline = tok.token_to_id("\n")
    copier = Predicts(lambda ids, t: ids[t - ids.tolist().index(newline)].item())    # a passage and a newline back
    assert hsd_train.copying(copier, tok, pairs) == {"share": 1.0, "matched": [2, 2, 3], "remaining": [2, 2, 3]}
    assert hsd_train.copying(Predicts(lambda ids, t: a), tok, pairs) == {"share": 3 / 7, "matched": [0, 1, 2],
                                                                          "remaining": [2, 2, 3]}


def test_copying_is_what_greedy_decoding_copies():
    """On the toy's own probe: greedy decoding reproduces exactly `matched` characters of each continuation, then
    writes another."""
    model, tok = models.load("toy-falcon-h1"), models.char_tokenizer()
    pairs = cost_model.copy_prompts(hsd_train.read_text("heldout").splitlines())[:4]
    result = hsd_train.copying(model, tok, pairs)
    assert max(result["matched"]) > 0 and result["remaining"] == [165] * 4
    for (prompt, rest), matched in zip(pairs, result["matched"]):
        made = hsd_train.continuation(model, tok, prompt, matched + 1)
        assert made[:matched] == rest[:matched] and made[matched] != rest[matched], (made, rest)

# --- What a user can mistype never destroys data ------------------------------------------------------------
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
        return {"seconds": 0.0, "heldout": {"bits_per_char": {"full": 8.0}}, "copying": {"share": 0.5, "passages": 2},
                "loop_share": {"share": 0.25}}
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
    assert hsd_train.main(["--model", "toy-qwen2.5", "--steps", "2", "--out", models.TOYS["toy-falcon-h1"]]) == 2
    assert "holds the shipped toy-falcon-h1, which training toy-qwen2.5 would replace" in one_line_error(capsys)
    threads = torch.get_num_threads()
    try:
        assert hsd_train.main(["--model", "toy-qwen2.5", "--steps", "3", "--out", shipped]) == 0
        assert "copies 50.0% of 2 held-out passages, greedy text's loop share 0.25" in capsys.readouterr().out
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


def test_a_misspelt_toy_or_option_is_one_line_saying_the_closest_and_json_is_stdout_alone(capsys, monkeypatch):
    for args, message in ((["--model", "toy-falcon-h"], "unknown toy 'toy-falcon-h': did you mean toy-falcon-h1?"),
                          (["--modle", "toy-falcon-h1"], "unknown option --modle: did you mean --model?")):
        with pytest.raises(SystemExit) as stop:
            hsd_train.main(args)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and err.count("\n") == 1, err
    row = {"bits_per_char": 2.0, "greedy": {"word_rate": 0.5, "different_words": 3},
           "T=0.6": {"word_rate": 0.25, "different_words": 4},
           "copying": {"share": 0.375, "matched": [1, 2], "remaining": [4, 4]}, "loop_share": 0.5}    # as report's
    monkeypatch.setattr(hsd_train, "report", lambda: {"toy-falcon-h1": row})
    assert hsd_train.main(["--report", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"toy-falcon-h1": row} and err.startswith("toy-falcon-h1   2.000 bits/char")
    assert "copies 37.5% of 2 held-out passages (3 of 8 characters); greedy text's loop share 0.50" in err
