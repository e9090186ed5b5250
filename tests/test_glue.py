"""The glue suite end to end on tiny local files in the real formats: a RoBERTa and a Mamba
(hidden size 32, 2 layers, word-level tokenizer) saved with save_pretrained as pretrained
and per-task checkpoints, GLUE data as the hub's parquet files; conversion, evaluation,
metrics, runs through the runner and the CLI, and the offline errors."""
from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("datasets")

from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    MambaConfig,
    MambaForCausalLM,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
)

from mergebench.errors import MissingResourceError  # noqa: E402
from mergebench.cli import main  # noqa: E402
from mergebench.metrics import METRICS, matthews_correlation, pearson_spearman  # noqa: E402
from mergebench.pool import CheckpointError  # noqa: E402
from mergebench.registry import BACKBONES  # noqa: E402
from mergebench.runner import run  # noqa: E402
from mergebench.tasks import _hub  # noqa: E402
from mergebench.tasks.glue import Mamba130M, RobertaBase, find_model  # noqa: E402
from mergebench.tasks._glue_data import GLUE_TASKS, GlueData, GlueDataError  # noqa: E402

WORDS = "the a cat dog bird runs sleeps sings big small red blue green old new quickly slowly and not very".split()
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids: <s>=0, <pad>=1, </s>=2
VOCAB = {token: i for i, token in enumerate(SPECIALS + WORDS)}
N_TRAIN, N_VALIDATION = 24, 14


# --- tiny files in the real formats ------------------------------------------------------------
def word_level_tokenizer(roberta: bool) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if roberta:  # <s> A </s></s> B </s>, as RoBERTa's tokenizer
        tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                       cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    # like GPT-NeoX's tokenizer for Mamba: no template and no pad token
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def write_glue(root: Path, seed: int = 0) -> Path:
    """Every GLUE task as the hub's parquet files (with its ClassLabel names and idx column)."""
    from datasets import ClassLabel, Dataset, Features, Value

    rng = np.random.default_rng(seed)
    for spec in GLUE_TASKS.values():
        label = Value("float32") if spec.regression else ClassLabel(names=list(spec.classes))
        features = Features({**{c: Value("string") for c in spec.text_columns}, "label": label, "idx": Value("int32")})
        for split, n in (("train", N_TRAIN), (spec.validation_split, N_VALIDATION)):
            columns = {c: [" ".join(rng.choice(WORDS, size=rng.integers(2, 7))) for _ in range(n)]
                       for c in spec.text_columns}
            labels = rng.uniform(0, 5, n).round(2).tolist() if spec.regression else rng.integers(0, len(spec.classes), n).tolist()
            path = root / spec.name / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            Dataset.from_dict({**columns, "label": labels, "idx": list(range(n))}, features=features).to_parquet(str(path))
    return root


def perturbed(state: dict[str, torch.Tensor], generator: torch.Generator, scale: float = 0.05):
    """A 'fine-tuned' copy: every floating tensor moved by seeded noise."""
    return {k: v + scale * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v.clone()
            for k, v in state.items()}


def roberta_config(**extra) -> RobertaConfig:
    return RobertaConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=40, type_vocab_size=1, pad_token_id=1,
                         bos_token_id=0, eos_token_id=2, **extra)


def write_roberta_checkpoints(root: Path) -> Path:
    """DIR/pretrained (a RobertaForMaskedLM, as FacebookAI/roberta-base) and DIR/<task>
    (RobertaForSequenceClassification): CoLA nested as EMR-Merging's cola/roberta-base_lr1e-05/,
    RTE as a pytorch_model.bin, the others as model.safetensors."""
    torch.manual_seed(0)
    pretrained = RobertaForMaskedLM(roberta_config()).eval()
    pretrained.save_pretrained(root / "pretrained")
    word_level_tokenizer(roberta=True).save_pretrained(root / "pretrained")
    generator = torch.Generator().manual_seed(1)
    for task in RobertaBase.task_names:
        spec = GLUE_TASKS[task]
        model = RobertaForSequenceClassification(roberta_config(num_labels=1 if spec.regression else len(spec.classes)))
        model.roberta.load_state_dict(perturbed(pretrained.roberta.state_dict(), generator), strict=False)
        folder = root / task / ("roberta-base_lr1e-05" if task == "cola" else "")
        model.save_pretrained(folder)
        if task == "rte":
            (folder / "model.safetensors").unlink()
            torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return root


def mamba_config() -> MambaConfig:
    return MambaConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, state_size=4, expand=2,
                       conv_kernel=4, time_step_rank=4, pad_token_id=1, bos_token_id=0, eos_token_id=2)


def write_mamba_checkpoints(root: Path) -> Path:
    """DIR/pretrained (a MambaForCausalLM, as state-spaces/mamba-130m-hf) and DIR/<task>:
    MambaModel under 'backbone.' + 'classifier.weight' (safetensors); QQP unprefixed with
    'score.weight' + bias as a pytorch_model.bin."""
    torch.manual_seed(0)
    pretrained = MambaForCausalLM(mamba_config()).eval()
    pretrained.save_pretrained(root / "pretrained")
    word_level_tokenizer(roberta=False).save_pretrained(root / "pretrained")
    generator = torch.Generator().manual_seed(2)
    for task in Mamba130M.task_names:
        classes = len(GLUE_TASKS[task].classes)
        folder = root / task
        folder.mkdir(parents=True)
        mamba_config().to_json_file(str(folder / "config.json"))
        encoder = perturbed(pretrained.backbone.state_dict(), generator)
        head = {"weight": 0.3 * torch.randn(classes, 32, generator=generator)}
        if task == "qqp":
            head["bias"] = torch.zeros(classes)
            torch.save({**encoder, **{f"score.{k}": v for k, v in head.items()}}, folder / "pytorch_model.bin")
        else:
            state = {**{f"backbone.{k}": v for k, v in encoder.items()}, "classifier.weight": head["weight"]}
            save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return root


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    return write_glue(tmp_path_factory.mktemp("glue-data"))


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory) -> Path:
    return write_roberta_checkpoints(tmp_path_factory.mktemp("roberta-checkpoints"))


@pytest.fixture(scope="module")
def mamba_dir(tmp_path_factory) -> Path:
    return write_mamba_checkpoints(tmp_path_factory.mktemp("mamba-checkpoints"))


@pytest.fixture(scope="module")
def roberta(roberta_dir, glue_dir) -> RobertaBase:
    backbone = BACKBONES.get("roberta-base")(checkpoint_dir=roberta_dir, data_dir=glue_dir)
    backbone.prepare()
    return backbone


@pytest.fixture
def no_hub(monkeypatch):
    """Any attempt to reach the hub fails at once, as on a machine without network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# --- metrics ------------------------------------------------------------------------------------
def test_matthews_by_hand():
    # confusion [[TN=2, FP=1], [FN=1, TP=2]]: (2*2 - 1*1) / sqrt(3*3*3*3) = 3/9
    predictions, labels = np.array([0, 0, 1, 1, 1, 0]), np.array([0, 0, 0, 1, 1, 1])
    assert matthews_correlation(predictions, labels) == pytest.approx(1 / 3)
    assert matthews_correlation(labels, labels) == pytest.approx(1.0)
    assert matthews_correlation(np.ones(4, int), np.array([0, 1, 0, 1])) == 0.0  # constant prediction


def test_pearson_spearman_by_hand():
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 4.0])
    # Pearson: centred x=(-1.5,-.5,.5,1.5), y=(-1.5,.5,-.5,1.5): 4/5; Spearman of ranks (same values): 4/5
    assert pearson_spearman(x, y) == pytest.approx(0.8)
    # a monotone but non-linear relation: Spearman 1, Pearson below 1
    z = np.array([1.0, 2.0, 3.0, 100.0])
    r = np.corrcoef(x, z)[0, 1]
    assert pearson_spearman(z, x) == pytest.approx((r + 1.0) / 2)
    # ties share their mean rank: ranks of (1, 2, 2, 3) are (1, 2.5, 2.5, 4)
    tied = np.array([1.0, 2.0, 2.0, 3.0])
    ranks = np.array([1.0, 2.5, 2.5, 4.0])
    expected = (np.corrcoef(tied, x)[0, 1] + np.corrcoef(ranks, x)[0, 1]) / 2
    assert pearson_spearman(tied, x) == pytest.approx(expected)
    assert pearson_spearman(np.full(4, 2.0), x) == 0.0  # constant scores: no correlation
    assert METRICS["pearson_spearman"] is pearson_spearman


def test_pearson_spearman_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, 50).astype(float)  # many ties
    y = x + rng.normal(0, 2, 50)
    expected = (stats.pearsonr(x, y)[0] + stats.spearmanr(x, y)[0]) / 2
    assert pearson_spearman(x, y) == pytest.approx(expected, abs=1e-12)


# --- data -----------------------------------------------------------------------------------------
def test_tasks_and_metrics_of_the_backbones():
    assert [t.name for t in RobertaBase().tasks] == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"]
    assert [t.name for t in Mamba130M().tasks] == ["cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte"]
    metrics = {t.name: (t.metric, t.outputs) for t in RobertaBase().tasks}
    assert metrics["cola"] == ("matthews", "class-logits")
    assert metrics["stsb"] == ("pearson_spearman", "regression")
    assert {metrics[t] for t in ("sst2", "mrpc", "qqp", "mnli", "qnli", "rte")} == {("accuracy", "class-logits")}
    assert GLUE_TASKS["mnli"].classes == ("entailment", "neutral", "contradiction")


def test_hub_parquet_layout_gives_validation_as_test(glue_dir):
    data = GlueData(glue_dir)
    assert len(data.split("mnli", "test")) == N_VALIDATION  # validation_matched
    assert len(data.split("mrpc", "train")) == N_TRAIN
    assert data.split("stsb", "test").features["label"].dtype == "float32"


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "save_to_disk"])
def test_other_local_formats_read_the_same_rows(glue_dir, tmp_path, fmt):
    reference = GlueData(glue_dir).load("rte")
    folder = tmp_path / "rte"
    if fmt == "save_to_disk":
        from datasets import DatasetDict

        DatasetDict(reference).save_to_disk(str(folder))
    else:
        folder.mkdir()
        for split, dataset in reference.items():
            frame = dataset.to_pandas()
            path = folder / f"{split}.{fmt}"
            if fmt == "jsonl":
                frame.to_json(path, orient="records", lines=True)
            else:
                frame.to_csv(path, sep="\t" if fmt == "tsv" else ",", index=False)
    loaded = GlueData(tmp_path).load("rte")
    for split in ("train", "validation"):
        assert loaded[split]["sentence1"] == reference[split]["sentence1"]
        assert loaded[split]["label"] == reference[split]["label"]


def test_bad_data_is_named(tmp_path, glue_dir):
    from datasets import Dataset

    with pytest.raises(MissingResourceError, match=r"cola.*is missing.*--local-dir"):
        GlueData(tmp_path).load("cola")
    (tmp_path / "cola").mkdir()
    Dataset.from_dict({"sentence": ["a b"], "label": [0]}).to_parquet(str(tmp_path / "cola" / "train-0.parquet"))
    with pytest.raises(MissingResourceError, match="no validation split"):
        GlueData(tmp_path).load("cola")
    Dataset.from_dict({"text": ["a b"], "label": [0]}).to_parquet(str(tmp_path / "cola" / "validation-0.parquet"))
    with pytest.raises(GlueDataError, match="no column sentence"):
        GlueData(tmp_path).load("cola")
    Dataset.from_dict({"sentence": ["a b"], "label": [-1]}).to_parquet(str(tmp_path / "cola" / "validation-0.parquet"))
    with pytest.raises(GlueDataError, match="hidden test labels"):
        GlueData(tmp_path).load("cola")


# --- conversion and evaluation: roberta-base ---------------------------------------------------------
def test_converted_model_reproduces_transformers_logits(roberta, roberta_dir, glue_dir):
    """Our encoder + head give the logits of the fine-tuned RobertaForSequenceClassification
    itself, on the tokenised validation pairs, for a classification and the regression task."""
    from safetensors.torch import load_file

    for task, folder in (("mrpc", roberta_dir / "mrpc"), ("stsb", roberta_dir / "stsb"),
                         ("cola", roberta_dir / "cola" / "roberta-base_lr1e-05"), ("rte", roberta_dir / "rte")):
        reference = RobertaForSequenceClassification.from_pretrained(folder).eval()
        encoder = roberta.build_encoder().eval()
        encoder.load_state_dict(load_file(str(roberta.finetuned_checkpoint(task))))
        inputs, _ = next(roberta.task(task).batches("test", batch_size=8))
        with torch.no_grad():
            ours = roberta.task(task).head().eval()(encoder(**inputs))
            theirs = reference(**inputs).logits
        assert ours.shape == theirs.shape == (8, 1 if task == "stsb" else 2)
        assert torch.allclose(ours, theirs, atol=1e-5), task


def test_pairs_are_tokenised_as_roberta_pairs(roberta, glue_dir):
    inputs = roberta.task("mrpc").exemplars(3, seed=0)
    rows = GlueData(glue_dir).split("mrpc", "train")
    ids = inputs["input_ids"][0][inputs["attention_mask"][0].bool()].tolist()
    assert ids[0] == VOCAB["<s>"] and ids[-1] == VOCAB["</s>"]
    assert [VOCAB["</s>"], VOCAB["</s>"]] in [ids[i : i + 2] for i in range(len(ids) - 1)]  # <s> A </s></s> B </s>
    assert inputs["input_ids"].shape[0] == 3 and len(rows) == N_TRAIN


def test_exemplars_are_seeded_train_samples(roberta):
    a, b, c = (roberta.task("qnli").exemplars(5, seed=s) for s in (0, 0, 1))
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["input_ids"], c["input_ids"])
    with pytest.raises(ValueError, match="25 exemplars asked, the train split has 24"):
        roberta.task("qnli").exemplars(N_TRAIN + 1, seed=0)


def test_only_the_encoder_is_merged_and_heads_come_from_each_checkpoint(roberta, roberta_dir):
    from safetensors.torch import load_file

    keys = load_file(str(roberta.pretrained_checkpoint())).keys()
    assert "model.embeddings.word_embeddings.weight" in keys and "model.encoder.layer.1.output.dense.weight" in keys
    assert not any("classifier" in k or "pooler" in k for k in keys)
    mnli = RobertaForSequenceClassification.from_pretrained(roberta_dir / "mnli")
    head = roberta.task("mnli").head()
    assert torch.equal(head.out_proj.weight, mnli.classifier.out_proj.weight)
    assert head.out_proj.weight.shape == (3, 32)


def test_individual_run_scores_the_fine_tuned_models(roberta, roberta_dir, glue_dir, tmp_path):
    """runner.run end to end; each metric equals the one computed from transformers' own
    fine-tuned models on the validation split (argmax, or the raw score for STS-B)."""
    result = run("individual", "roberta-base", checkpoint_dir=roberta_dir, data_dir=glue_dir, results_dir=tmp_path,
                 batch_size=5)
    assert list(result.metrics) == list(RobertaBase.task_names)
    data = GlueData(glue_dir)
    for task in RobertaBase.task_names:
        spec = GLUE_TASKS[task]
        folder = roberta_dir / task / ("roberta-base_lr1e-05" if task == "cola" else "")
        model = RobertaForSequenceClassification.from_pretrained(folder).eval()
        rows = data.split(task, "test")[:]
        with torch.no_grad():
            logits = model(**roberta.task(task).data.tokenize(task, rows)).logits
        predictions = logits[:, 0].numpy() if spec.regression else logits.argmax(-1).numpy()
        expected = METRICS[spec.metric](predictions, np.asarray(rows["label"]))
        assert result.metrics[task] == pytest.approx(expected, abs=1e-6), task
    record = json.loads((tmp_path / "roberta-base.jsonl").read_text())
    assert record["suite"] == "glue" and record["metrics"] == pytest.approx(result.metrics)


def test_task_arithmetic_runs_and_zero_scaling_is_the_pretrained_model(roberta, roberta_dir, glue_dir):
    kwargs = dict(checkpoint_dir=roberta_dir, data_dir=glue_dir, results_dir=None)
    merged = run("task-arithmetic", "roberta-base", **kwargs)
    zero = run("task-arithmetic", "roberta-base", hyperparameters={"scaling": 0.0}, **kwargs)
    pretrained = run("pretrained", "roberta-base", **kwargs)
    assert zero.metrics == pytest.approx(pretrained.metrics)  # lambda = 0 is the pretrained encoder
    assert all(np.isfinite(v) for v in merged.metrics.values())
    assert -1.0 <= merged.metrics["stsb"] <= 1.0 and -1.0 <= merged.metrics["cola"] <= 1.0


def fake_hub_cache(cache: Path, repos: dict[tuple[str, str], Path]) -> Path:
    """A Hugging Face hub cache holding these folders as the snapshots of (repo type, repo id),
    laid out as huggingface_hub writes it (refs/main -> snapshots/<commit>/...)."""
    import shutil

    for (repo_type, repo_id), folder in repos.items():
        repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("0" * 40)
        shutil.copytree(folder, repo / "snapshots" / ("0" * 40))
    return cache


def test_hub_downloads_in_the_cache_are_used_offline(roberta_dir, glue_dir, tmp_path, no_hub, monkeypatch):
    """The hub path on files already in the hub cache: `mergebench prepare` and `run` with no
    --checkpoint-dir / --data-dir give the same scores as the same files given locally."""
    from huggingface_hub import constants

    hub = fake_hub_cache(tmp_path / "hub", {
        ("model", "FacebookAI/roberta-base"): roberta_dir / "pretrained",
        ("model", "vanillaOVO/roberta_base_glue_ckpts"): roberta_dir,
        ("dataset", "nyu-mll/glue"): glue_dir,
    })
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.delenv("MERGEBENCH_CHECKPOINT_DIR", raising=False)
    monkeypatch.delenv("MERGEBENCH_DATA_DIR", raising=False)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        assert main(["prepare", "--backbone", "roberta-base"]) == 0, err.getvalue()
        assert main(["run", "--method", "individual", "--backbone", "roberta-base",
                     "--results-dir", str(tmp_path / "results")]) == 0, err.getvalue()
    from_hub = json.loads((tmp_path / "results" / "roberta-base.jsonl").read_text())["metrics"]
    local = run("individual", "roberta-base", checkpoint_dir=roberta_dir, data_dir=glue_dir, results_dir=None)
    assert from_hub == pytest.approx(local.metrics)
    sources = json.loads((RobertaBase().root / "sources.json").read_text())
    assert sources["cola"].endswith("cola/roberta-base_lr1e-05")  # EMR-Merging's nested folder, found in the repo


# --- mamba-130m ----------------------------------------------------------------------------------------
def test_mamba_individual_run_uses_last_token_and_each_head(mamba_dir, glue_dir, tmp_path):
    result = run("individual", "mamba-130m", checkpoint_dir=mamba_dir, data_dir=glue_dir, results_dir=None)
    assert list(result.metrics) == list(Mamba130M.task_names)
    backbone = Mamba130M(checkpoint_dir=mamba_dir, data_dir=glue_dir)
    assert backbone.tokenizer.pad_token == "</s>"  # set from eos: the pretrained tokenizer had none
    # by hand for QQP (the unprefixed .bin with score.* and a bias): MambaModel, last real token, linear head
    state = torch.load(mamba_dir / "qqp" / "pytorch_model.bin", weights_only=True)
    from transformers import MambaModel

    model = MambaModel(mamba_config()).eval()
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("score.")})
    rows = backbone.data.split("qqp", "test")[:]
    predictions = []
    for a, b in zip(rows["question1"], rows["question2"]):  # one at a time: no padding at all
        ids = backbone.tokenizer(a, b, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            last = model(input_ids=ids).last_hidden_state[0, -1]
        predictions.append(int((last @ state["score.weight"].T + state["score.bias"]).argmax()))
    expected = float(np.mean(np.array(predictions) == np.array(rows["label"])))
    assert result.metrics["qqp"] == pytest.approx(expected)


def test_mamba_task_arithmetic_runs(mamba_dir, glue_dir):
    result = run("task-arithmetic", "mamba-130m", checkpoint_dir=mamba_dir, data_dir=glue_dir, results_dir=None)
    assert set(result.metrics) == set(Mamba130M.task_names)
    assert all(0.0 <= result.metrics[t] <= 1.0 for t in Mamba130M.task_names if t != "cola")


# --- errors and offline behaviour ----------------------------------------------------------------------
def test_finding_a_model_folder():
    files = ["cola/roberta-base_lr1e-05/config.json", "cola/roberta-base_lr1e-05/pytorch_model.bin",
             "cola/roberta-base_lr1e-05/model.safetensors", "cola/roberta-base_lr1e-05/checkpoint-500/config.json",
             "cola/roberta-base_lr1e-05/checkpoint-500/model.safetensors", "sst2/config.json", "sst2/model.safetensors"]
    assert find_model(files, "cola") == ("cola/roberta-base_lr1e-05/",
                                          ["cola/roberta-base_lr1e-05/config.json", "cola/roberta-base_lr1e-05/model.safetensors"])
    assert find_model(files, "sst2") == ("sst2/", ["sst2/config.json", "sst2/model.safetensors"])
    assert find_model(files, "mrpc") is None
    assert find_model(["config.json", "model.safetensors"], tokenizer=True) is None
    with pytest.raises(CheckpointError, match="several checkpoints"):
        find_model(["rte/a/config.json", "rte/a/model.safetensors", "rte/b/config.json", "rte/b/model.safetensors"], "rte")


def test_wrong_checkpoints_are_named(roberta_dir, glue_dir, tmp_path):
    import shutil

    broken = tmp_path / "checkpoints"
    shutil.copytree(roberta_dir, broken)
    shutil.rmtree(broken / "sst2")  # a masked-LM checkpoint where a classifier belongs
    RobertaForMaskedLM(roberta_config()).save_pretrained(broken / "sst2")
    backbone = RobertaBase(checkpoint_dir=broken, data_dir=glue_dir)
    with pytest.raises(CheckpointError, match=r"sst2.*not a RobertaForSequenceClassification"):
        backbone.prepare()
    shutil.rmtree(broken / "sst2")  # a classifier with the wrong number of labels
    RobertaForSequenceClassification(roberta_config(num_labels=3)).save_pretrained(broken / "sst2")
    with pytest.raises(CheckpointError, match="3 outputs, GLUE sst2 needs 2"):
        RobertaBase(checkpoint_dir=broken, data_dir=glue_dir).prepare()


def test_missing_checkpoint_offline_fails_fast_naming_it(glue_dir, tmp_path, no_hub):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()  # no pretrained/, no task folders: the hub would be needed
    start = time.perf_counter()
    with pytest.raises(MissingResourceError) as error:
        RobertaBase(checkpoint_dir=checkpoints, data_dir=glue_dir).prepare()
    assert time.perf_counter() - start < 10
    message = str(error.value)
    assert "FacebookAI/roberta-base" in message and "--checkpoint-dir" in message and "HF_HUB_OFFLINE" in message


def test_unreachable_hub_fails_fast(glue_dir, tmp_path, monkeypatch):
    """No offline flag, but the endpoint refuses connections: the probe fails in seconds."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for variable in (*_hub.OFFLINE_VARIABLES, *_hub.PROXY_VARIABLES):
        monkeypatch.delenv(variable, raising=False)
    _hub.probe.cache_clear()  # the real probe, not a remembered answer
    start = time.perf_counter()
    with pytest.raises(MissingResourceError, match=r"nyu-mll/glue.*127\.0\.0\.1:9.*--data-dir"):
        GlueData().load("cola")
    assert time.perf_counter() - start < 10


def test_mamba_without_fine_tuned_checkpoints_says_where_they_go(mamba_dir, glue_dir, tmp_path, no_hub):
    import shutil

    shutil.copytree(mamba_dir / "pretrained", tmp_path / "pretrained")  # the pretrained model only
    with pytest.raises(MissingResourceError,
                       match=r"fine-tuned on GLUE cola.*cola/ is missing.*--checkpoint-dir.*MERGEBENCH_MAMBA_130M_REPO"):
        Mamba130M(checkpoint_dir=tmp_path, data_dir=glue_dir).prepare()


def test_cli_offline_run_fails_in_seconds_and_writes_nothing(glue_dir, tmp_path, no_hub, monkeypatch):
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    results = tmp_path / "results"
    stderr = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(stderr):
        code = main(["run", "--method", "task-arithmetic", "--backbone", "roberta-base", "--results-dir", str(results),
                     "--data-dir", str(glue_dir)])
    assert time.perf_counter() - start < 20
    assert code == 2
    assert "FacebookAI/roberta-base" in stderr.getvalue() and "--checkpoint-dir" in stderr.getvalue()
    assert not results.exists()
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert main(["prepare", "--backbone", "mamba-130m"]) == 2  # no data either: the dataset is named
    assert "nyu-mll/glue" in err.getvalue() and "--data-dir" in err.getvalue()


def test_list_shows_the_glue_backbones():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["list"]) == 0
    text = out.getvalue()
    for name in ("roberta-base", "mamba-130m"):
        assert any(line.split()[:2] == [name, "glue"] for line in text.splitlines() if line.strip()), name
    assert any(line.split()[:1] == ["glue"] and "roberta-base" in line and "mamba-130m" in line
               for line in text.splitlines())
