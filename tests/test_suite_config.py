"""Suite files: a suite of tiny BERT sequence classifiers and data files written here is
registered, prepared, merged and evaluated like a built-in suite; every bad input named in
one line with its key and file."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mergebench.cli import main
from mergebench.errors import MergebenchError
from mergebench.suite_config import ENVIRONMENT, SuiteConfigError, register_suite_config

WORDS = ["good", "bad", "fine", "awful", "red", "blue", "green", "cat", "dog", "sun", "rain", "tree"]


@pytest.fixture(autouse=True)
def no_inherited_suite_files(monkeypatch):
    """What a test registers is not passed on to processes started by later tests."""
    monkeypatch.setenv(ENVIRONMENT, "")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """A pretrained tiny BERT (with tokenizer), two fine-tuned sequence classifiers (2 and 3
    labels), a RoBERTa classifier, and data files for both tasks."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast
    from transformers import RobertaConfig, RobertaForSequenceClassification

    root = tmp_path_factory.mktemp("suite-files")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast.from_pretrained(str(root))  # reads vocab.txt (the constructor ignores vocab_file in transformers 5)
    assert tokenizer.unk_token_id not in tokenizer(" ".join(WORDS))["input_ids"]
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    pretrained = BertModel(config)
    pretrained.save_pretrained(root / "pretrained")
    tokenizer.save_pretrained(root / "pretrained")
    for task, labels in (("sentiment", ["negative", "positive"]), ("colour", ["red", "green", "blue"])):
        settings = {**config.to_dict(), "id2label": dict(enumerate(labels)),
                    "label2id": {name: i for i, name in enumerate(labels)}}
        model = BertForSequenceClassification(BertConfig(**settings))
        model.bert.load_state_dict(pretrained.state_dict())
        with torch.no_grad():  # "fine-tuning": a task-specific change of every encoder weight
            for parameter in model.bert.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        model.save_pretrained(root / task)
    # a RoBERTa family too, whose classifier reads the hidden states itself (the BERT tokenizer's ids fit it)
    roberta_config = RobertaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=40)
    roberta = RobertaForSequenceClassification(roberta_config)
    roberta.roberta.save_pretrained(root / "roberta-pretrained")
    tokenizer.save_pretrained(root / "roberta-pretrained")
    for task, labels in (("sentiment", ["negative", "positive"]), ("colour", ["red", "green", "blue"])):
        settings = {**roberta_config.to_dict(), "id2label": dict(enumerate(labels)),
                    "label2id": {name: i for i, name in enumerate(labels)}}
        model = RobertaForSequenceClassification(RobertaConfig(**settings))
        model.roberta.load_state_dict(roberta.roberta.state_dict())
        with torch.no_grad():
            for parameter in model.roberta.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        model.save_pretrained(root / f"roberta-{task}")
    rng = np.random.default_rng(0)
    data = root / "data"
    data.mkdir()
    for split, n in (("train", 24), ("test", 16)):
        words = rng.choice(WORDS, size=(n, 4))
        sentiment = np.arange(n) % 2
        lines = [f"{' '.join(w)},{y}" for w, y in zip(words, sentiment)]
        (data / f"sentiment-{split}.csv").write_text("sentence,label\n" + "\n".join(lines) + "\n")
        colours = np.array(["red", "green", "blue"])[np.arange(n) % 3]
        rows = [{"text": " ".join(w), "colour": c} for w, c in zip(words, colours)]
        (data / f"colour-{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def write_suite(folder: Path, stem: str, **changes) -> Path:
    """``<stem>.toml`` in the checkpoints' folder naming the suite ``stem``; ``changes`` replace
    or (value None) drop lines."""
    lines = {
        "name": f'name = "{stem}"',
        "pretrained": 'pretrained = "./pretrained"',
        "max_length": "max_length = 16",
        "sentiment": '[tasks.sentiment]\ncheckpoint = "./sentiment"\ntrain = "data/sentiment-train.csv"\n'
                     'test = "data/sentiment-test.csv"\ntext = "sentence"\nlabel = "label"',
        "colour": '[tasks.colour]\ncheckpoint = "./colour"\ntrain = "data/colour-train.jsonl"\n'
                  'test = "data/colour-test.jsonl"\ntext = "text"\nlabel = "colour"\nmetric = "accuracy"',
    }
    for key, value in changes.items():
        if value is None:
            lines.pop(key)
        else:
            lines[key] = value
    path = folder / f"{stem}.toml"
    path.write_text("\n".join(lines.values()) + "\n")
    return path


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_a_suite_file_runs_like_a_built_in_suite(checkpoints, tmp_path, family):
    import pandas as pd
    from transformers import AutoModelForSequenceClassification

    from mergebench.registry import BACKBONES

    name, prefix = (f"my-{family}", "" if family == "bert" else "roberta-")
    changes = {} if family == "bert" else {
        "pretrained": 'pretrained = "./roberta-pretrained"',
        "sentiment": '[tasks.sentiment]\ncheckpoint = "./roberta-sentiment"\ntrain = "data/sentiment-train.csv"\n'
                     'test = "data/sentiment-test.csv"\ntext = "sentence"\nlabel = "label"',
        "colour": '[tasks.colour]\ncheckpoint = "./roberta-colour"\ntrain = "data/colour-train.jsonl"\n'
                  'test = "data/colour-test.jsonl"\ntext = "text"\nlabel = "colour"'}
    suite = write_suite(checkpoints, name, **changes)
    results = tmp_path / "results"
    assert main(["prepare", "--suite-config", str(suite)]) == 0
    assert main(["run", "--suite-config", str(suite), "--method", "pretrained,task-arithmetic",
                 "--results-dir", str(results)]) == 0
    records = [json.loads(line) for line in (results / f"{name}.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["pretrained", "task-arithmetic"]
    assert all(r["suite"] == name and set(r["metrics"]) == {"sentiment", "colour"} for r in records)
    assert records[0]["checkpoint_manifest"] is not None

    # the "pretrained" row: each task's own fine-tuned classifier on the pretrained encoder,
    # computed here with transformers alone
    backbone = BACKBONES.get(name)()
    for task, column, text in (("sentiment", "label", "sentence"), ("colour", "colour", "text")):
        classifier = AutoModelForSequenceClassification.from_pretrained(str(checkpoints / f"{prefix}{task}")).eval()
        pre = AutoModelForSequenceClassification.from_pretrained(
            str(checkpoints / f"{prefix}pretrained"), num_labels=classifier.config.num_labels).eval()
        pre.classifier.load_state_dict(classifier.classifier.state_dict())
        path = checkpoints / "data" / (f"{task}-test.csv" if task == "sentiment" else f"{task}-test.jsonl")
        frame = pd.read_csv(path) if path.suffix == ".csv" else pd.read_json(path, lines=True)
        encoded = backbone.tokenizer(frame[text].tolist(), padding=True, return_tensors="pt")
        with torch.no_grad():
            predictions = pre(**encoded).logits.argmax(1).numpy()
        labels = frame[column].to_numpy() if task == "sentiment" else \
            np.array([classifier.config.label2id[c] for c in frame[column]])
        assert records[0]["metrics"][task] == pytest.approx(float(np.mean(predictions == labels)))


def test_a_suite_file_sweeps_with_validation_selection(checkpoints, tmp_path):
    suite = write_suite(checkpoints, "sweep-suite")
    results = tmp_path / "results"
    assert main(["sweep", "--suite-config", str(suite), "--method", "ties", "--grid", "keep=0.2,0.5",
                 "--select-on", "validation", "--validation-size", "8", "--results-dir", str(results)]) == 0
    record, = [json.loads(line) for line in (results / "sweep-suite.jsonl").read_text().splitlines()]
    assert record["suite"] == "sweep-suite" and len(record["selection"]["points"]) == 2


def test_a_suite_file_merges_and_exports(checkpoints, tmp_path):
    from transformers import AutoTokenizer

    import mergebench

    suite = write_suite(checkpoints, "export-suite")
    out = tmp_path / "merged"
    assert main(["merge", "--suite-config", str(suite), "--method", "t-switch", "--out", str(out)]) == 0
    metadata = json.loads((out / "mergebench.json").read_text())
    assert metadata["backbone"] == "export-suite" and "[tasks.colour]" in metadata["suite_config"]["text"]
    model = mergebench.load(out)
    inputs = model.merged.backbone.task("colour").exemplars(4, seed=0, split="test")
    assert model(task="colour", **inputs).shape == (4, 3)
    tokenizer = AutoTokenizer.from_pretrained(str(out))  # the suite's tokenizer is exported beside the model
    assert tokenizer("red cat")["input_ids"] == model.merged.backbone.tokenizer("red cat")["input_ids"]
    # a fresh process knows nothing of the suite: load registers it from the file text the export kept
    script = ("import sys, mergebench; model = mergebench.load(sys.argv[1]); "
              "print(model.merged.backbone.name, *model.tasks)")
    done = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["export-suite", "sentiment", "colour"]


@pytest.mark.parametrize("stem, changes, match", [
    ("typo", {"max_length": "max_lenght = 16"}, r"typo\.toml: unknown key 'max_lenght'; valid keys: name, kind,"),
    ("task-typo", {"colour": '[tasks.colour]\ncheckpoint = "./colour"\ntrain = "data/colour-train.jsonl"\n'
                             'test = "data/colour-test.jsonl"\ntext = "text"\nlabels = "colour"'},
     r"task-typo\.toml: unknown key 'tasks\.colour\.labels'; valid keys: checkpoint, dataset"),
    ("no-tasks", {"sentiment": None, "colour": None}, r"no-tasks\.toml: missing key 'tasks'"),
    ("no-checkpoint", {"colour": '[tasks.colour]\ntrain = "data/colour-train.jsonl"\ntest = "data/colour-test.jsonl"\n'
                                 'text = "text"\nlabel = "colour"'},
     r"no-checkpoint\.toml: missing key 'tasks\.colour\.checkpoint'"),
    ("missing-folder", {"colour": '[tasks.colour]\ncheckpoint = "./colour-v2"\ntrain = "data/colour-train.jsonl"\n'
                                  'test = "data/colour-test.jsonl"\ntext = "text"\nlabel = "colour"'},
     r"missing-folder\.toml: tasks\.colour\.checkpoint: checkpoint folder .*colour-v2 does not exist"),
    ("missing-column", {"colour": '[tasks.colour]\ncheckpoint = "./colour"\ntrain = "data/colour-train.jsonl"\n'
                                  'test = "data/colour-test.jsonl"\ntext = "sentence"\nlabel = "colour"'},
     r"missing-column\.toml: tasks\.colour\.text: column 'sentence' is not in .*colour-train\.jsonl; its columns: "
     r"text, colour"),
    ("other-architecture", {"colour": '[tasks.colour]\ncheckpoint = "./roberta-colour"\ntrain = "data/colour-train.jsonl"\n'
                                      'test = "data/colour-test.jsonl"\ntext = "text"\nlabel = "colour"'},
     r"other-architecture\.toml: tasks\.colour\.checkpoint: .*roberta-colour is a 'roberta' model, the pretrained model "
     r".*pretrained a 'bert' one: architectures differ"),
    ("label-count", {"colour": '[tasks.colour]\ncheckpoint = "./sentiment"\ntrain = "data/colour-train.jsonl"\n'
                               'test = "data/colour-test.jsonl"\ntext = "text"\nlabel = "colour"'},
     r"label-count\.toml: tasks\.colour\.label: label 'red' in .*colour-train\.jsonl does not fit the head of "
     r".*sentiment: 2 outputs, classes negative, positive"),
    ("label-range", {"sentiment": '[tasks.sentiment]\ncheckpoint = "./colour"\ntrain = "data/sentiment-train.csv"\n'
                                  'test = "data/sentiment-test.csv"\ntext = "sentence"\nlabel = "label"'},
     r"label-range\.toml: tasks\.sentiment\.label: the data has 2 distinct labels, the head of .*colour has 3 outputs"),
    ("bad-name", {"name": 'name = "my suite"'}, r"bad-name\.toml: name: 'my suite' is not a plain name"),
])
def test_bad_suite_files_are_named_with_their_key(checkpoints, stem, changes, match):
    with pytest.raises(SuiteConfigError, match=match):
        register_suite_config(write_suite(checkpoints, stem, **changes))


def test_a_hub_id_fails_fast_offline(checkpoints, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    suite = write_suite(checkpoints, "hub", pretrained='pretrained = "someone/not-cached-model"')
    with pytest.raises(MergebenchError, match=r"someone/not-cached-model.*offline mode: HF_HUB_OFFLINE"):
        register_suite_config(suite)


def test_the_cli_names_a_bad_file_in_one_line(checkpoints, capsys):
    suite = write_suite(checkpoints, "cli-typo", max_length="max_lenght = 16")
    assert main(["run", "--suite-config", str(suite), "--method", "task-arithmetic", "--no-save"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "unknown key 'max_lenght'" in error and "cli-typo.toml" in error
    with pytest.raises(SystemExit) as info:  # one of the two is required, as argparse says
        main(["run", "--method", "task-arithmetic", "--no-save"])
    assert info.value.code == 2 and "--backbone --suite-config is required" in capsys.readouterr().err


def test_a_sweep_on_ray_workers_registers_the_suite_file_there(checkpoints, tmp_path):
    pytest.importorskip("ray")  # the sweep's optional dependency (the `ray` extra)
    suite = write_suite(checkpoints, "ray-suite")
    results = tmp_path / "results"
    assert main(["sweep", "--suite-config", str(suite), "--method", "task-arithmetic", "--grid", "scaling=0.2",
                 "--results-dir", str(results)]) == 0
    record, = [json.loads(line) for line in (results / "ray-suite.jsonl").read_text().splitlines()]
    assert record["suite"] == "ray-suite" and record["hyperparameters"]["scaling"] == 0.2
