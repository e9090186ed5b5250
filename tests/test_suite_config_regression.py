"""Regression heads in text-classification suite files: a sequence classifier of one output
(STS-B-like sentence-pair scores) is scored by the mean of Pearson's and Spearman's
correlations; bad combinations named with their key and file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mergebench.cli import main
from mergebench.suite_config import ENVIRONMENT, SuiteConfigError, register_suite_config

WORDS = ["good", "bad", "fine", "awful", "red", "blue", "green", "cat", "dog", "sun", "rain", "tree"]


@pytest.fixture(autouse=True)
def no_inherited_suite_files(monkeypatch):
    monkeypatch.setenv(ENVIRONMENT, "")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A pretrained tiny BERT, a regression classifier (num_labels = 1), a 2-label classifier,
    and sentence-pair score files."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("regression-suite-files")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast.from_pretrained(str(root))  # reads vocab.txt (the constructor ignores vocab_file in transformers 5)
    assert tokenizer.unk_token_id not in tokenizer(" ".join(WORDS))["input_ids"]
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, initializer_range=0.1)  # varied outputs
    torch.manual_seed(0)
    pretrained = BertModel(config)
    pretrained.save_pretrained(root / "pretrained")
    tokenizer.save_pretrained(root / "pretrained")
    for task, settings in (("similarity", {"num_labels": 1, "problem_type": "regression"}), ("pairs", {"num_labels": 2})):
        model = BertForSequenceClassification(BertConfig(**{**config.to_dict(), **settings}))
        model.bert.load_state_dict(pretrained.state_dict())
        with torch.no_grad():
            for parameter in model.bert.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
            model.classifier.weight.normal_()
        model.save_pretrained(root / task)
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("test", 24)):
        first, second = (rng.choice(WORDS, size=(n, 3)) for _ in range(2))
        scores = np.round(rng.uniform(0, 5, n), 2)
        lines = [f"{' '.join(a)},{' '.join(b)},{s},{int(s > 2.5)}" for a, b, s in zip(first, second, scores)]
        (root / f"pairs-{split}.csv").write_text("sentence1,sentence2,score,same\n" + "\n".join(lines) + "\n")
    (root / "words-test.csv").write_text("sentence1,sentence2,score\ncat,dog,4.5\nsun,rain,low\n")
    return root


def write(folder, name: str, similarity: str = "", pairs: str | None = None):
    pairs = pairs if pairs is not None else ('[tasks.pairs]\ncheckpoint = "./pairs"\ntrain = "pairs-train.csv"\n'
                                             'test = "pairs-test.csv"\ntext = ["sentence1", "sentence2"]\nlabel = "same"\n')
    path = folder / f"{name}.toml"
    path.write_text(f'name = "{name}"\npretrained = "./pretrained"\nmax_length = 16\n\n'
                    '[tasks.similarity]\ncheckpoint = "./similarity"\ntrain = "pairs-train.csv"\ntest = "pairs-test.csv"\n'
                    f'text = ["sentence1", "sentence2"]\nlabel = "score"\n{similarity}\n{pairs}')
    return path


def test_a_regression_head_is_scored_by_its_correlations(files, tmp_path):
    import pandas as pd
    from scipy.stats import pearsonr, spearmanr
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from mergebench.registry import SUITES

    suite = write(files, "sts-like")
    results = tmp_path / "results"
    assert main(["prepare", "--suite-config", str(suite)]) == 0
    assert main(["run", "--suite-config", str(suite), "--method", "pretrained,task-arithmetic",
                 "--results-dir", str(results)]) == 0
    records = [json.loads(line) for line in (results / "sts-like.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["pretrained", "task-arithmetic"]
    task = next(t for t in SUITES.get("sts-like").tasks if t.name == "similarity")
    assert (task.outputs, task.metric) == ("regression", "pearson_spearman")

    # the "pretrained" row: the regression head on the pretrained encoder, with transformers and scipy alone
    regressor = AutoModelForSequenceClassification.from_pretrained(str(files / "similarity")).eval()
    model = AutoModelForSequenceClassification.from_pretrained(str(files / "pretrained"), num_labels=1).eval()
    model.classifier.load_state_dict(regressor.classifier.state_dict())
    frame = pd.read_csv(files / "pairs-test.csv")
    tokens = AutoTokenizer.from_pretrained(str(files / "pretrained"))(
        frame["sentence1"].tolist(), frame["sentence2"].tolist(), padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = model(**tokens).logits[:, 0].numpy()
    expected = (pearsonr(scores, frame["score"]).statistic + spearmanr(scores, frame["score"]).statistic) / 2
    assert records[0]["metrics"]["similarity"] == pytest.approx(float(expected), abs=1e-6)
    assert records[0]["metrics"]["similarity"] != records[1]["metrics"]["similarity"]


@pytest.mark.parametrize("name, similarity, pairs, match", [
    ("regression-accuracy", 'metric = "accuracy"', None,
     r"regression-accuracy\.toml: tasks\.similarity\.metric: .*similarity has a regression head \(one output\): its "
     r"metric is pearson_spearman, not 'accuracy'"),
    ("classifier-correlation", "", '[tasks.pairs]\ncheckpoint = "./pairs"\ntrain = "pairs-train.csv"\n'
     'test = "pairs-test.csv"\ntext = ["sentence1", "sentence2"]\nlabel = "same"\nmetric = "pearson_spearman"\n',
     r"classifier-correlation\.toml: tasks\.pairs\.metric: .*pairs has a classifier of 2 outputs; pearson_spearman "
     r"scores a regression head"),
    ("word-scores", "", '[tasks.words]\ncheckpoint = "./similarity"\ntrain = "pairs-train.csv"\n'
     'test = "words-test.csv"\ntext = ["sentence1", "sentence2"]\nlabel = "score"\n',
     r"word-scores\.toml: tasks\.words\.label: label 'low' in .*words-test\.csv is not a finite number"),
])
def test_bad_regression_tasks_are_named_with_their_key(files, name, similarity, pairs, match):
    with pytest.raises(SuiteConfigError, match=match):
        register_suite_config(write(files, name, similarity, pairs))
