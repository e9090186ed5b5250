"""The ``glue`` suite: RoBERTa-base and Mamba-130M fine-tuned on GLUE tasks.

Protocol of EMR-Merging (Huang et al., NeurIPS 2024) and T-Switch (Qi et al., CVPR 2025),
whose code (github.com/harveyhuang18/EMR_Merging ``merge_lm/``,
github.com/lfy-123/Binary-Task-Switch ``merge_lm/``) builds on DARE's MergeLM: one
``RobertaForSequenceClassification`` per task; everything but the classifier is merged
(``exclude_param_names_regex=[".*classifier.*"]``); each task keeps its own fine-tuned
classifier as its head; inputs are tokenised as sentence pairs where the task has two,
at most 128 tokens; scores on the full GLUE validation split (``_glue_data.py``; T-Switch's
script caps each at ``eval_subset_size=500`` examples, EMR-Merging's does not).
Auto-FlexSwitch (arXiv 2604.28109, Sec. IV-A3) adds Mamba-130M on seven of the tasks
(no STS-B), fine-tuned by its authors (AdamW, 4000 steps, batch 256, lr 5e-5).

Backbones
* ``roberta-base``: pretrained ``FacebookAI/roberta-base``; the eight fine-tuned models
  (CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE) from the hub repository that
  EMR-Merging publishes and Auto-FlexSwitch reuses, ``vanillaOVO/roberta_base_glue_ckpts``.
  Others with the same one-folder-per-task layout can be named in
  ``$MERGEBENCH_ROBERTA_BASE_REPO``: T-Switch's ``lfy-hg/roberta_base_on_glue``,
  Twin-Merging's ``lu-vae/roberta-glue`` (their layouts were not checked offline).
  The merged part is the RoBERTa encoder (embeddings and layers); an input's feature is
  the last hidden state of its ``<s>`` token, which is what ``RobertaClassificationHead``
  reads (and what T-Switch's code uses as the k-NN feature).
* ``mamba-130m``: pretrained ``state-spaces/mamba-130m-hf`` (transformers' ``MambaModel``;
  its pure-PyTorch path runs on CPU). No fine-tuned GLUE models are published, so they
  come from ``--checkpoint-dir`` (or a hub repository named in ``$MERGEBENCH_MAMBA_130M_REPO``).
  Accepted per task: ``config.json`` of a ``MambaConfig`` and weights with the MambaModel
  under ``backbone.`` (as in ``MambaForCausalLM`` and the community
  ``MambaForSequenceClassification``, github.com/getorca/mamba_for_sequence_classification)
  or unprefixed, plus a linear head ``classifier.weight`` (or ``score.weight``), bias
  optional. Pooling: the hidden state of the last non-padding token, as that classifier
  and transformers' decoder classifiers (``*ForSequenceClassification`` of GPT-2, Llama) do.
  Pairs are encoded by the tokenizer's own pair encoding (GPT-NeoX's: the two texts'
  tokens one after the other), as a Trainer recipe fine-tuning such a model produces.

Local checkpoints, ``--checkpoint-dir DIR`` (or ``$MERGEBENCH_CHECKPOINT_DIR``):
``DIR/pretrained/`` (config.json, model.safetensors or pytorch_model.bin, tokenizer files)
and ``DIR/<task>/`` per task (config.json + weights, directly or in one sub-folder, e.g.
EMR-Merging's ``cola/roberta-base_lr1e-05/``). What DIR lacks comes from the hub.

``mergebench prepare`` converts the checkpoints once into safetensors of the encoder state
and of each head under ``$MERGEBENCH_CACHE/<backbone>/<fingerprint of the sources>/``
(floating tensors as float32), with the tokenizer and the encoder config; ``--force``
converts again (e.g. after the local files changed). ``.bin`` files are read with
``weights_only=True``; nothing is unpickled.
"""
from __future__ import annotations

import abc
import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from mergebench.cache import cache_dir, update_json, write_atomically, write_safetensors
from mergebench.errors import MissingResourceError
from mergebench.pool import CheckpointError
from mergebench.registry import register_backbone, register_suite
from mergebench.suite import Suite
from mergebench.task import Batch, TaskData
from mergebench.tasks._hub import list_files
from mergebench.tasks._prepared import PreparedBackbone, check_like_pretrained
from mergebench.tasks._text_classification import _stable_hash
from mergebench.tasks._glue_data import (GLUE_TASKS, GlueData, MissingGlueResource, all_missing, collect_missing,
                                         glue_task, hub_snapshot)

if TYPE_CHECKING:  # transformers is imported where a model is built: listing the plugins stays fast
    from transformers import MambaConfig, RobertaConfig

CONVERSION_VERSION = 1  # bump when the converted files change meaning
WEIGHT_FILES = ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json")


# --- locating a Hugging Face model folder ------------------------------------------------
def find_model(files: list[str], prefix: str = "", tokenizer: bool = False) -> tuple[str, list[str]] | None:
    """The shallowest folder under ``prefix`` with a config.json and weights (safetensors
    preferred), and the files to take from it; None if there is none. Two candidate folders
    at the same depth (e.g. two learning rates) are ambiguous: CheckpointError."""
    base = f"{prefix.rstrip('/')}/" if prefix else ""
    folders = sorted(
        {f[: -len("config.json")] for f in files if f.startswith(base) and f.rsplit("/", 1)[-1] == "config.json"},
        key=lambda folder: (folder.count("/"), folder),
    )
    candidates = []
    for folder in folders:
        names = {f[len(folder):] for f in files if f.startswith(folder) and "/" not in f[len(folder):]}
        weights = sorted(n for n in names if any(fnmatch.fnmatch(n, w) for w in WEIGHT_FILES))
        weights = [n for n in weights if "safetensors" in n] or weights
        tokens = sorted(names & set(TOKENIZER_FILES))
        if weights and (tokens or not tokenizer):
            candidates.append((folder, [f"{folder}config.json", *(folder + n for n in weights + tokens)]))
    if not candidates:
        return None
    depth = candidates[0][0].count("/")
    tied = [folder or "./" for folder, _ in candidates if folder.count("/") == depth]
    if len(tied) > 1:
        raise CheckpointError(f"several checkpoints under {prefix or 'the folder'}: {', '.join(tied)}; keep one")
    return candidates[0]


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder's weight files (safetensors, else .bin with weights_only)."""
    names = [n for n in sorted(os.listdir(folder)) if any(fnmatch.fnmatch(n, w) for w in WEIGHT_FILES)
             and not n.endswith(".json")]
    safetensors = [n for n in names if n.endswith(".safetensors")]
    state: dict[str, torch.Tensor] = {}
    for name in safetensors or names:
        path = folder / name
        try:
            state.update(load_file(str(path)) if name.endswith(".safetensors")
                         else torch.load(path, map_location="cpu", weights_only=True))
        except Exception as error:  # safetensors / torch raise their own types
            raise CheckpointError(f"cannot read {path}: {error}") from error
    if not state:
        raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin")
    return state


# --- modules ---------------------------------------------------------------------------------
class RobertaEncoder(nn.Module):
    """RoBERTa without pooler; an input's feature is the last hidden state of its <s> token."""

    def __init__(self, config: RobertaConfig):
        from transformers import RobertaModel

        super().__init__()
        self.model = RobertaModel(config, add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]


def _as_sequence(head: nn.Module, args: tuple) -> tuple:
    return (args[0].unsqueeze(1),)  # (batch, hidden) -> (batch, 1, hidden): the <s> feature is the first token


def pooled_roberta_head(hidden_size: int, num_labels: int) -> nn.Module:
    """transformers' RobertaClassificationHead (dense, tanh, out_proj) on the <s> feature."""
    from transformers import RobertaConfig
    from transformers.models.roberta.modeling_roberta import RobertaClassificationHead

    head = RobertaClassificationHead(RobertaConfig(hidden_size=hidden_size, num_labels=num_labels, num_attention_heads=1))
    head.register_forward_pre_hook(_as_sequence)
    return head


class MambaEncoder(nn.Module):
    """Mamba; an input's feature is the hidden state of its last non-padding token."""

    def __init__(self, config: MambaConfig):
        from transformers import MambaModel

        super().__init__()
        self.model = MambaModel(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.long() * positions).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


# --- the backbones --------------------------------------------------------------------------------
class GlueBackbone(PreparedBackbone):
    """A pretrained model with one fine-tuned checkpoint per GLUE task, converted once into
    encoder and head safetensors; subclasses read their model family's checkpoints."""

    suite = "glue"
    prepare_hint = "(with the same --checkpoint-dir / --data-dir)"
    task_names: ClassVar[tuple[str, ...]]
    model_type: ClassVar[str]  # config.json "model_type" of every checkpoint
    config_class: ClassVar[str]  # the name of transformers' config class of the model family
    pretrained_repo: ClassVar[str]
    finetuned_repo: ClassVar[str | None] = None
    finetuned_format: ClassVar[str]  # what a task's folder holds, for error messages
    max_length: ClassVar[int] = 128

    def __init__(self, checkpoint_dir: Path | str | None = None, data_dir: Path | str | None = None,
                 root: Path | str | None = None):
        super().__init__(checkpoint_dir=checkpoint_dir, data_dir=data_dir)
        self.data = GlueData(self.data_dir)
        self.root = Path(root) if root is not None else cache_dir() / self.name / self._fingerprint()

    # --- what subclasses provide ----------------------------------------------------------
    @abc.abstractmethod
    def read_pretrained(self, folder: Path) -> tuple[Any, dict[str, torch.Tensor]]:
        """(config, encoder state) of a pretrained model folder."""

    @abc.abstractmethod
    def read_finetuned(self, folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(encoder state, head state) of a fine-tuned model folder."""

    @abc.abstractmethod
    def encoder_from_config(self, config) -> nn.Module: ...

    @abc.abstractmethod
    def head_from_state(self, state: dict[str, torch.Tensor]) -> nn.Module: ...

    @staticmethod
    def head_outputs(state: dict[str, torch.Tensor]) -> int:
        """The number of outputs of a head: the rows of its last weight matrix."""
        return next(v.shape[0] for k, v in reversed(state.items()) if k.endswith("weight"))

    def adjust_tokenizer(self, tokenizer):
        return tokenizer

    @classmethod
    def repo_variable(cls) -> str:
        return "MERGEBENCH_" + cls.name.upper().replace("-", "_") + "_REPO"

    def finetuned_source_repo(self) -> str | None:
        return os.environ.get(self.repo_variable()) or self.finetuned_repo

    def _fingerprint(self) -> str:
        key = {
            "version": CONVERSION_VERSION,
            "checkpoint_dir": str(self.checkpoint_dir.resolve()) if self.checkpoint_dir else None,
            "pretrained_repo": self.pretrained_repo,
            "finetuned_repo": self.finetuned_source_repo(),
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]

    # --- the encoder and its tokenizer ----------------------------------------------------------
    def build_encoder(self) -> nn.Module:
        import transformers

        config_path = self.require(self.root / "config.json")
        return self.encoder_from_config(getattr(transformers, self.config_class).from_json_file(str(config_path)))

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.require(self.root / "tokenizer")), local_files_only=True)

    # --- preparation ------------------------------------------------------------------------------
    def prepare(self, force: bool = False) -> None:
        """Check that every task's data is readable, then convert what is missing (every
        source is located before any conversion, and one error names everything missing)."""
        missing: list[MissingResourceError] = []
        for task in self.task_names:
            collect_missing(missing, self.data.load, task)
        base = ("pretrained.safetensors", "config.json", "tokenizer")
        base_missing = force or not all((self.root / name).exists() for name in base)
        todo = [t for t in self.task_names
                if force or not all((self.root / f"{t}{s}").exists() for s in (".safetensors", ".head.safetensors"))]
        pretrained_folder = collect_missing(missing, self._pretrained_folder) if base_missing else None
        folders = {task: collect_missing(missing, self._finetuned_folder, task) for task in todo}
        if missing:
            raise all_missing(self.name, missing)
        if not base_missing and not todo:
            return
        if pretrained_folder is not None:
            self._convert_pretrained(pretrained_folder)
        reference = load_file(str(self.root / "pretrained.safetensors"))
        for task in tqdm(todo, desc=f"{self.name}: converting", unit="task", leave=False):
            self._convert_finetuned(task, folders[task], reference)
        sources = {task: str(folder) for task, folder in folders.items()}
        if pretrained_folder is not None:
            sources["pretrained"] = str(pretrained_folder)
        update_json(self.root / "sources.json", sources)

    def _convert_pretrained(self, folder: Path) -> None:
        from transformers import AutoTokenizer

        config, state = self.read_pretrained(folder)
        tokenizer = self.adjust_tokenizer(AutoTokenizer.from_pretrained(str(folder), local_files_only=True))
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=".tokenizer."))
        try:
            tokenizer.save_pretrained(str(staging))
            shutil.rmtree(self.root / "tokenizer", ignore_errors=True)
            os.replace(staging, self.root / "tokenizer")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        write_atomically(self.root / "config.json", lambda tmp: tmp.write_text(config.to_json_string()))
        write_safetensors(self.root / "pretrained.safetensors", state, float32=True)

    def _convert_finetuned(self, task: str, folder: Path, reference: dict[str, torch.Tensor]) -> None:
        spec = glue_task(task)
        encoder, head = self.read_finetuned(folder)
        outputs, wanted = self.head_outputs(head), 1 if spec.regression else len(spec.classes)
        if outputs != wanted:
            raise CheckpointError(f"{folder}: its head has {outputs} outputs, GLUE {task} needs {wanted}")
        check_like_pretrained(folder, encoder, reference)
        write_safetensors(self.root / f"{task}.head.safetensors", head, float32=True)
        write_safetensors(self.root / f"{task}.safetensors", encoder, float32=True)

    # --- sources -----------------------------------------------------------------------------------
    def _local_root(self) -> Path | None:
        if self.checkpoint_dir is None:
            return None
        if not self.checkpoint_dir.is_dir():
            raise MissingResourceError(f"--checkpoint-dir {self.checkpoint_dir} does not exist")
        return self.checkpoint_dir

    def _local_model(self, folder: Path, tokenizer: bool) -> Path:
        found = find_model(list_files(folder), tokenizer=tokenizer)
        if found is None:
            needs = "config.json, model.safetensors (or pytorch_model.bin)" + (" and tokenizer files" if tokenizer else "")
            raise MissingResourceError(f"{folder} holds no Hugging Face model: it needs {needs}")
        return folder / found[0]

    def _hub_model(self, repo: str, prefix: str, tokenizer: bool, what: str, hint: str) -> Path:
        def select(files: list[str]) -> list[str] | None:
            found = find_model(files, prefix, tokenizer)
            return found[1] if found else None

        root = hub_snapshot(repo, select=select, what=what, hint=hint)
        return root / find_model(list_files(root), prefix, tokenizer)[0]

    def _pretrained_folder(self) -> Path:
        local = self._local_root()
        if local is not None and (local / "pretrained").is_dir():
            return self._local_model(local / "pretrained", tokenizer=True)
        repo = self.pretrained_repo
        hint = (f"Download it where there is network (`huggingface-cli download {repo} --local-dir DIR/pretrained`), "
                "copy DIR here and pass --checkpoint-dir DIR (or set $MERGEBENCH_CHECKPOINT_DIR).")
        return self._hub_model(repo, "", True, f"the pretrained {self.name} model", hint)

    def _finetuned_folder(self, task: str) -> Path:
        local = self._local_root()
        if local is not None and (local / task).is_dir():
            return self._local_model(local / task, tokenizer=False)
        layout = f"DIR/<task>/ holding {self.finetuned_format}"
        repo = self.finetuned_source_repo()
        if repo is None:
            where = f" ({local}/{task}/ is missing)" if local is not None else ""
            raise MissingGlueResource(
                f"the {self.name} checkpoint fine-tuned on GLUE {task}{where}",
                "is needed" + ("" if local is not None else " and no --checkpoint-dir is given"),
                f"Pass --checkpoint-dir DIR (or set $MERGEBENCH_CHECKPOINT_DIR) with {layout}, or name a hub "
                f"repository with one folder per task in ${self.repo_variable()}.",
            )
        hint = (f"Download them where there is network (`huggingface-cli download {repo} --local-dir DIR`, or add "
                f"--include '<task>/*' for one task), copy DIR here and pass --checkpoint-dir DIR ({layout}).")
        return self._hub_model(repo, task, False, f"the {self.name} checkpoint fine-tuned on GLUE {task}", hint)

    def _check_model_type(self, folder: Path) -> None:
        config = folder / "config.json"
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type != self.model_type:
            raise CheckpointError(f"{config}: model_type {model_type!r}, {self.name} needs {self.model_type!r}")


class GlueTaskData(TaskData):
    """The GLUE tasks read through one backbone: the GLUE data of its ``--data-dir`` (or the
    hub), tokenised by its tokenizer, and the classifier of each fine-tuned checkpoint."""

    def __init__(self, backbone: GlueBackbone):
        self.backbone = backbone

    def head(self, task: str) -> nn.Module:
        backbone = self.backbone
        backbone.check_task(task)
        return backbone.head_from_state(load_file(str(backbone.require(backbone.root / f"{task}.head.safetensors"))))

    def split_size(self, task: str, split: str) -> int:
        return len(self.backbone.data.split(task, split))

    def batch(self, task: str, split: str, start: int, stop: int) -> Batch:
        rows = self.backbone.data.split(task, split)[start:stop]
        dtype = torch.float32 if glue_task(task).regression else torch.long
        return self.tokenize(task, rows), torch.tensor(rows["label"], dtype=dtype)

    def exemplars(self, task: str, n: int, seed: int, split: str = "train") -> dict[str, Any]:
        dataset = self.backbone.data.split(task, split)
        if n > len(dataset):
            raise ValueError(f"{self.backbone.name}/{task}: {n} exemplars asked, the {split} split has {len(dataset)}")
        picks = np.random.default_rng([seed, _stable_hash(task)]).choice(len(dataset), size=n, replace=False)
        return self.tokenize(task, dataset[sorted(picks.tolist())])

    def tokenize(self, task: str, rows: dict[str, list]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask of a batch of rows (sentence pairs where the task has two)."""
        texts = [["" if t is None else t for t in rows[column]] for column in glue_task(task).text_columns]
        encoded = self.backbone.tokenizer(
            *texts, padding=True, truncation=True, max_length=self.backbone.max_length, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


register_suite(Suite("glue", [spec.task for spec in GLUE_TASKS.values()], GlueTaskData,
                     description="8 GLUE tasks, scored on the validation splits (MNLI matched)"))


@register_backbone("roberta-base")
class RobertaBase(GlueBackbone):
    name = "roberta-base"
    description = "RoBERTa-base fine-tuned per GLUE task (EMR-Merging / T-Switch checkpoints; 8 tasks)"
    task_names = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")
    model_type = "roberta"
    config_class = "RobertaConfig"
    pretrained_repo = "FacebookAI/roberta-base"
    finetuned_repo = "vanillaOVO/roberta_base_glue_ckpts"
    finetuned_format = "config.json and model.safetensors (or pytorch_model.bin) of a RobertaForSequenceClassification"

    def encoder_from_config(self, config) -> nn.Module:
        return RobertaEncoder(config)

    def head_from_state(self, state):
        num_labels, hidden = state["out_proj.weight"].shape
        head = pooled_roberta_head(hidden, num_labels)
        head.load_state_dict(state, strict=True)
        return head

    def read_pretrained(self, folder):
        from transformers import RobertaModel

        self._check_model_type(folder)
        model, info = RobertaModel.from_pretrained(
            str(folder), add_pooling_layer=False, output_loading_info=True, local_files_only=True
        )
        if info["missing_keys"]:
            raise CheckpointError(f"{folder}: not a RoBERTa checkpoint, missing {sorted(info['missing_keys'])[:5]}")
        return model.config, {f"model.{k}": v for k, v in model.state_dict().items()}

    def read_finetuned(self, folder):
        from transformers import RobertaForSequenceClassification

        self._check_model_type(folder)
        model, info = RobertaForSequenceClassification.from_pretrained(
            str(folder), output_loading_info=True, local_files_only=True
        )
        if info["missing_keys"]:  # e.g. a masked-LM checkpoint: its classifier would be random
            raise CheckpointError(
                f"{folder}: not a RobertaForSequenceClassification checkpoint, missing {sorted(info['missing_keys'])[:5]}"
            )
        encoder = {f"model.{k}": v for k, v in model.roberta.state_dict().items()}
        return encoder, dict(model.classifier.state_dict())


@register_backbone("mamba-130m")
class Mamba130M(GlueBackbone):
    name = "mamba-130m"
    description = "Mamba-130M fine-tuned per GLUE task (Auto-FlexSwitch; 7 tasks, checkpoints from --checkpoint-dir)"
    task_names = ("cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte")
    model_type = "mamba"
    config_class = "MambaConfig"
    pretrained_repo = "state-spaces/mamba-130m-hf"
    finetuned_format = ("config.json (MambaConfig) and model.safetensors (or pytorch_model.bin) with the MambaModel "
                        "under 'backbone.' and a linear head 'classifier.weight' (or 'score.weight')")

    def encoder_from_config(self, config) -> nn.Module:
        return MambaEncoder(config)

    def head_from_state(self, state):
        weight = state["weight"]
        head = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in state)
        head.load_state_dict(state, strict=True)
        return head

    def adjust_tokenizer(self, tokenizer):
        if tokenizer.pad_token is None:  # GPT-NeoX's tokenizer may come without one
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"  # the pooled token is found from the attention mask either way
        return tokenizer

    def read_pretrained(self, folder):
        from transformers import MambaModel

        self._check_model_type(folder)
        model, info = MambaModel.from_pretrained(str(folder), output_loading_info=True, local_files_only=True)
        if info["missing_keys"]:
            raise CheckpointError(f"{folder}: not a Mamba checkpoint, missing {sorted(info['missing_keys'])[:5]}")
        return model.config, {f"model.{k}": v for k, v in model.state_dict().items()}

    def read_finetuned(self, folder):
        self._check_model_type(folder)
        state = _read_weights(folder)
        head = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(("classifier.", "score."))}
        rest = {k: v for k, v in state.items() if not k.startswith(("classifier.", "score.", "lm_head."))}
        prefixed = any(k.startswith("backbone.") for k in rest)
        encoder = {f"model.{k.removeprefix('backbone.')}": v for k, v in rest.items() if not prefixed or k.startswith("backbone.")}
        stray = sorted(k for k in rest if prefixed and not k.startswith("backbone."))
        if stray:
            raise CheckpointError(f"{folder}: unexpected tensors {stray[:5]}")
        if set(head) - {"weight", "bias"} or "weight" not in head:
            raise CheckpointError(
                f"{folder}: needs a linear head classifier.weight (or score.weight), found {sorted(head) or 'none'}"
            )
        return encoder, head
