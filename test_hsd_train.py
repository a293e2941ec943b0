"""Tests for hsd_train.py and the trained toys it made: python -m pytest -q test_hsd_train.py (offline): what they
were trained on, that they load as recorded, that they are worth looking at."""
import hashlib
import json
import os
import signal

import pytest
import torch

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
    """Each shipped toy, loaded like an official checkpoint, gives the held-out loss its training log recorded."""
    log, model = training_log(name), models.load(name)
    windows = hsd_train.heldout_windows()
    bits = hsd_train.heldout_bits_per_char(model, windows)
    assert abs(bits - log["heldout"]["bits_per_char"]["full"]) < 1e-4 * bits, (bits, log["heldout"])
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
    assert len({(c.hidden_size, c.num_layers, c.vocab_size) for c in configs.values()}) == 1
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
    monkeypatch.setattr(hsd_train, "HELDOUT_WINDOWS", 8)                  # the log's held-out losses: 8 windows, not 32
    log = hsd_train.train("toy-qwen2.5", str(tmp_path / "whole"), 0, schedule, curve_every=4)
    curve = log["curve"]["rows"]
    assert curve[-1][2] < curve[0][2] - 0.2, curve                 # held-out bits per character fall
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
