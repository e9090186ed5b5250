"""Protocols: named published settings of every method's hyperparameters and of evaluation.

A number in a paper's table comes from one setting (a discard rate, a merge function, an
exemplar count, which test examples were scored); a row of mergebench is only comparable with
it under the same one. A protocol names such a setting: per method, each hyperparameter value
with its source (table, section or file), and the evaluation details: scoring only the first
N test examples of a suite's tasks (in the split's order), the evaluation batch (what
per-batch routing averages over) and tasks of a suite left out. A run resolves its method as
class defaults <- protocol values <- explicit ``--hp`` values; the record stores the protocol
and which names were set explicitly over it (``overrides``), and the leaderboard never ranks
rows of different protocols as one list.

``original`` is every method's own paper / authors' code default, i.e. the class defaults
made explicit with their sources (a test keeps the two equal). Any other protocol lists the
values its paper gives; a method or hyperparameter it does not name keeps its ``original``
value, and ``mergebench list --protocol NAME`` shows each value's source, saying so.

Every value is checked against the method's typed hyperparameters by ``check_protocol``
(the tests check every protocol for every method), so a misspelt name or a bad value fails.
This module imports the standard library only (the command line lists protocols without
torch); checking a protocol loads the methods.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from mergebench.errors import HyperparameterError, UnknownNameError

DEFAULT = "original"  # the protocol of a run that names none
DEFAULT_BATCH_SIZE = 64  # evaluation batch of a protocol that sets none


@dataclass(frozen=True)
class Setting:
    """One value of a protocol and where it comes from."""

    value: Any
    source: str


@dataclass(frozen=True)
class Protocol:
    """A named setting: ``methods`` maps method -> hyperparameter -> Setting; ``test_examples``
    maps suite -> Setting(N): that suite's tasks are scored on their first N test examples;
    ``batch_size``: the evaluation batch (it decides what per-batch routing averages over);
    ``left_out`` maps suite -> Setting(task names) the protocol neither merges nor scores."""

    name: str
    description: str
    methods: Mapping[str, Mapping[str, Setting]]
    test_examples: Mapping[str, Setting] = field(default_factory=dict)
    batch_size: Setting | None = None
    left_out: Mapping[str, Setting] = field(default_factory=dict)

    def tasks_left_out(self, suite: str) -> tuple[str, ...]:
        """The tasks of ``suite`` this protocol neither merges nor scores (e.g. GLUE's STS-B)."""
        setting = self.left_out.get(suite)
        return () if setting is None else tuple(setting.value)

    @property
    def eval_batch_size(self) -> int:
        """The evaluation batch size a run takes unless ``--batch-size`` sets one."""
        return DEFAULT_BATCH_SIZE if self.batch_size is None else int(self.batch_size.value)

    def values(self, method: str) -> dict[str, Any]:
        """The hyperparameter values this protocol sets for ``method`` (lists copied)."""
        return {name: (list(s.value) if isinstance(s.value, list) else s.value)
                for name, s in self.methods.get(method, {}).items()}

    def setting(self, method: str, hyperparameter: str) -> Setting | None:
        """The protocol's own setting of one hyperparameter (None: it keeps ``original``'s)."""
        return self.methods.get(method, {}).get(hyperparameter)

    def test_limit(self, suite: str) -> int | None:
        """Score only the first N test examples of each task of ``suite`` (None: all of them)."""
        setting = self.test_examples.get(suite)
        return None if setting is None else int(setting.value)


def _table(rows: Mapping[str, Mapping[str, tuple[Any, str]]]) -> dict[str, dict[str, Setting]]:
    """``{method: {name: (value, source)}}`` as Settings: each protocol reads as one small table."""
    return {method: {name: Setting(value, source) for name, (value, source) in values.items()}
            for method, values in rows.items()}


# --- original: each method's own paper / authors' code (the class defaults, made explicit) -----

_FLEXSWITCH = {
    "loss": ("kl", "Auto-FlexSwitch §III-C2 Eq. 9 (KL, the loss of its ablations §IV-B)"),
    "lambda": (None, "Auto-FlexSwitch Table I: the loss's own lambda (KL 1, MSE 1, CKA 10)"),
    "exemplars": (100, "Auto-FlexSwitch §III-C5: N = 100 samples per task"),
    "batch_size": (32, "ours (the paper does not give it)"),
    "steps": (500, "Auto-FlexSwitch §III-C5 / §IV-A1: 500 Adam steps"),
    "lr_lgs": (0.05, "Auto-FlexSwitch §IV-A1: LGS learning rate 5e-2"),
    "lr_bas": (0.1, "Auto-FlexSwitch §IV-A1: BAS learning rate 1e-1"),
    "rho": (1.0, "Auto-FlexSwitch §IV-A1: rho initialised at 1.0"),
    "omega": (1.0, "Auto-FlexSwitch §IV-A1: omega initialised at 1.0"),
    "decay": (0.9, "Auto-FlexSwitch §IV-A1: decayed by 0.9 ..."),
    "decay_every": (10, "Auto-FlexSwitch §IV-A1: ... every 10 steps"),
    "bit_widths": ([1, 2, 4, 8], "Auto-FlexSwitch §III-C3: W = {1, 2, 4, 8}"),
    "reuse_training": (True, "ours (a cache of trained switches; changes no number)"),
    "format": ("sass", "Auto-FlexSwitch §III-D / Eq. 16: the SASS grouped-COO storage (ans, ours, changes no "
                       "accuracy)"),
}

# AdaMerging and AdaMerging++ learn their coefficients the same way (++ adds the TIES step)
_ADAMERGING = {
    "exemplars": (256, "ours: 256 unlabelled test inputs per task (the authors read the whole test set)"),
    "steps": (500, "AdaMerging authors' code: 500 iterations"),
    "batch_size": (16, "AdaMerging authors' code: 16 test inputs per task per step"),
    "lr": (1e-3, "AdaMerging authors' code: Adam lr 1e-3"),
    "init": (0.3, "AdaMerging authors' code: prior 0.3"),
    "clamp": (True, "AdaMerging authors' code: coefficients clamped to [0, 1]"),
}

ORIGINAL = Protocol(
    "original",
    "each method's own paper or its authors' code (mergebench's defaults)",
    _table({
        "pretrained": {},
        "individual": {},
        "weight-averaging": {},
        "emr-merging": {},  # tuning-free
        "task-arithmetic": {
            "scaling": (0.3, "lambda 0.3: the ViT setting of the AdaMerging / EMR-Merging / T-Switch tables"),
        },
        "ties": {
            "keep": (0.2, "TIES paper / authors' code: top-k 20% (K = 20)"),
            "scaling": (0.3, "lambda 0.3: the ViT setting of the AdaMerging / EMR-Merging / T-Switch tables"),
            "merge_func": ("mean", "TIES paper's disjoint mean (authors' disjoint_merge 'dis-mean')"),
        },
        "dare": {
            "drop_rate": (0.5, "DARE: drop rate p = 0.5 (FusionBench CLIP setting)"),
            "scaling": (0.3, "FusionBench CLIP setting: lambda 0.3"),
        },
        "fisher": {
            "exemplars": (256, "FusionBench clip_fisher_merging.yaml num_fisher_examples 256"),
            "fisher_floor": (1e-6, "authors' merging.py fisher_floor 1e-6"),
            "normalize": (True, "authors' normalize_fishers=True"),
        },
        "regmean": {
            "exemplars": (256, "FusionBench clip_regmean.yaml num_regmean_examples 256"),
            "alpha": (0.9, "RegMean paper: off-diagonal scaling alpha 0.9"),
        },
        "adamerging": dict(_ADAMERGING),
        "adamerging++": {
            **_ADAMERGING,
            "keep": (0.2, "AdaMerging authors' ties_merging_split: K = 20"),
            "merge_func": ("sum", "AdaMerging authors' main_layer_wise_adamergingpp.py: merge_func 'dis-sum'"),
        },
        "twin-merging": {
            "exemplars": (100, "ours: 100 unlabelled training inputs per task (T-Switch Table 5's N)"),
            "rank_rule": ("ratio", "Twin-Merging authors' sparsify.svd: rank = int(density * min(rows, cols))"),
            "rank_ratio": (0.1, "Twin-Merging authors' run script: mask_rate 0.9, i.e. density 0.1"),
            "rank": (16, "ours: the rank of rank_rule fixed"),
            "svd": ("randomized", "ours: scikit-learn randomized_svd (Halko et al. 2011) defaults, rank-r error "
                    "within 1.01x of the authors' full SVD (benchmarks/twin_svd.py); exact selectable"),
            "scope": ("all-2d", "Twin-Merging authors' extract_twin_vector: every tensor, 1-D ones dense"),
            "shared": ("task-arithmetic", "Twin-Merging authors' code: Task Arithmetic shared expert"),
            "shared_scaling": (0.3, "lambda 0.3 (T-Switch Table 5)"),
            "router_epochs": (10, "T-Switch Table 5: 10 epochs (the authors' router.py: 50)"),
            "router_batch_size": (1024, "Twin-Merging authors' per_device_train_batch_size 1024"),
            "router_lr": (1e-3, "T-Switch Table 5: lr 1e-3 (the authors' router.py: 5e-4)"),
            "router_lr_decay": (True, "Twin-Merging authors' HF Trainer: linear decay to 0"),
            "router_features": ("shared", "Twin-Merging authors' router.py: features of the shared expert"),
        },
        "t-switch": {
            "alpha": (0.5, "T-Switch paper §4.1 / Table 5: discard ratio 0.5"),
            "format": ("tswitch", "ours: bit-packed mask, signs and knob (changes no accuracy)"),
        },
        "auto-switch": {
            "alpha": (0.5, "T-Switch paper Table 5: discard ratio 0.5"),
            "exemplars": (100, "T-Switch paper Table 5: N = 100"),
            "neighbours": (10, "Auto-FlexSwitch §IV-B: stable at C = 10 neighbours"),
            "query_model": ("averaged", "T-Switch §3.3 (Auto-Switch's own paper): query features under theta + "
                                        "the averaged switches (Eq. 4), which it finds makes tasks easier to tell apart"),
            "routing": ("per-input", "T-Switch Eq. 8 / Auto-FlexSwitch Eq. 5: each input its own k-NN weights"),
        },
        "flexswitch": dict(_FLEXSWITCH),
        "auto-flexswitch": {
            **_FLEXSWITCH,
            "centres": (20, "Auto-FlexSwitch §IV-B: E = 20 (fixed while r is ablated)"),
            "rank": (32, "Auto-FlexSwitch §IV-A1: r = 32"),
            "metric_lr": (0.5, "Auto-FlexSwitch §IV-A1: learning rate 0.5 for L"),
            "metric_epochs": (100, "Auto-FlexSwitch §IV-A1: 100 epochs"),
            "neighbours": (10, "Auto-FlexSwitch §IV-B: stable at C = 10 neighbours"),
            "routing": ("per-input", "Auto-FlexSwitch §III-C5 / Eq. 5: each input its own k-NN weights"),
        },
    }),
)

# --- t-switch-cvpr2025: Table 5 of "Less is More" (CVPR 2025) and its evaluation --------------

T5 = "T-Switch Table 5"
TSWITCH_CVPR2025 = Protocol(
    "t-switch-cvpr2025",
    "T-Switch (CVPR 2025) Table 5 and its authors' evaluation: discard 0.5 everywhere, TIES dis-sum, "
    "Auto-Switch routed per single-task batch of 256, GLUE scored on the first 500 validation examples",
    _table({
        "task-arithmetic": {"scaling": (0.3, f"{T5}: scaling coef 0.3")},
        "ties": {
            "keep": (0.5, f"{T5}: discard 0.5 (keep 0.5)"),
            "scaling": (0.3, f"{T5}: scaling coef 0.3"),
            "merge_func": ("sum", "dis-sum of the AdaMerging / EMR-Merging / T-Switch ViT tables and FusionBench's "
                                  "ties_merging.yaml (merge_func: sum)"),
        },
        "dare": {"drop_rate": (0.5, f"{T5}: discard 0.5")},
        "regmean": {"exemplars": (256, f"{T5}: N = 256")},
        "fisher": {"exemplars": (4096, f"{T5}: N = 4096")},
        "adamerging": {
            "lr": (1e-3, f"{T5}: lr 1e-3"),
            "steps": (500, f"{T5}: 500 epochs (iterations)"),
        },
        "adamerging++": {
            "keep": (0.5, f"{T5}: discard 0.5 (keep 0.5)"),
            "merge_func": ("sum", "the dis-sum of the ViT tables' TIES (AdaMerging authors' code), as for ties"),
            "lr": (1e-3, f"{T5}: lr 1e-3"),
            "steps": (500, f"{T5}: 500 epochs (iterations)"),
        },
        "twin-merging": {
            "exemplars": (100, f"{T5}: N = 100"),
            "rank_rule": ("ratio", "Twin-Merging authors' code: rank = int(density * min(rows, cols))"),
            "rank_ratio": (0.5, f"{T5}: discard 0.5, the authors' one discard rate (mask_rate): density 0.5"),
            "scope": ("all-2d", "Twin-Merging authors' code: every tensor, 1-D ones dense"),
            "shared_scaling": (0.3, f"{T5}: scaling coef 0.3"),
            "router_lr": (1e-3, f"{T5}: lr 1e-3"),
            "router_epochs": (10, f"{T5}: 10 epochs"),
        },
        "t-switch": {"alpha": (0.5, f"{T5}: discard 0.5")},
        "auto-switch": {
            "alpha": (0.5, f"{T5}: discard 0.5"),
            "exemplars": (100, f"{T5}: N = 100"),
            "query_model": ("averaged", "T-Switch §3.3: query features under theta + the averaged switches"),
            "routing": ("per-batch", "T-Switch authors' released code: k-NN weights averaged over a single-task "
                                     "test batch (not automatic in deployment)"),
        },
    }),
    test_examples={"glue": Setting(500, "T-Switch authors' released code: the first 500 GLUE validation "
                                        "examples per task")},
    batch_size=Setting(256, "T-Switch authors' released code: single-task test batches of 256 inputs, the "
                            "batch Auto-Switch's per-batch routing averages over"),
)

# --- auto-flexswitch-2026: §IV of Auto-FlexSwitch (arXiv 2604.28109) --------------------------

IVA1 = "Auto-FlexSwitch §IV-A1"
AUTO_FLEXSWITCH_2026 = Protocol(
    "auto-flexswitch-2026",
    "Auto-FlexSwitch (2026) §IV where it gives a value, GLUE without STS-B (its Tables II/VIII grid-searched "
    "baseline values are not in the text mergebench has: those keep the original values, and the sources say so)",
    _table({
        "fisher": {"exemplars": (4096, f"{IVA1}: the original paper's sample size (Fisher authors' "
                                       "compute_fisher.py n_examples 4096)")},
        "regmean": {"exemplars": (1000, f"{IVA1}: the original paper's sample size (RegMean authors' "
                                        "roberta-base-regmean.yaml gram_n_example 1000)")},
        "t-switch": {"alpha": (0.5, "Auto-FlexSwitch §IV-B: alpha 0.5 (the smallest of its ablation grid)")},
        "auto-switch": {
            "alpha": (0.5, "Auto-FlexSwitch §IV-B / Table VI: alpha 0.5"),
            "exemplars": (100, "ours: N = 100 (§IV-B ablates 100, 300, 500; §III-C5 uses 100)"),
            "neighbours": (10, "Auto-FlexSwitch §IV-B: C = 10"),
            "query_model": ("pretrained", "Auto-FlexSwitch Eq. 5: pretrained features"),
            "routing": ("per-input", "Auto-FlexSwitch Eq. 5: each input routed on its own"),
        },
        "flexswitch": {
            "lr_lgs": (0.05, f"{IVA1}: 5e-2"), "lr_bas": (0.1, f"{IVA1}: 1e-1"), "steps": (500, f"{IVA1}: 500 steps"),
            "rho": (1.0, f"{IVA1}: 1.0"), "omega": (1.0, f"{IVA1}: 1.0"), "decay": (0.9, f"{IVA1}: 0.9"),
            "decay_every": (10, f"{IVA1}: every 10 steps"),
            "exemplars": (100, "Auto-FlexSwitch §III-C5: N = 100"),
        },
        "auto-flexswitch": {
            "lr_lgs": (0.05, f"{IVA1}: 5e-2"), "lr_bas": (0.1, f"{IVA1}: 1e-1"), "steps": (500, f"{IVA1}: 500 steps"),
            "rho": (1.0, f"{IVA1}: 1.0"), "omega": (1.0, f"{IVA1}: 1.0"), "decay": (0.9, f"{IVA1}: 0.9"),
            "decay_every": (10, f"{IVA1}: every 10 steps"),
            "exemplars": (100, "Auto-FlexSwitch §III-C5: N = 100"),
            "rank": (32, f"{IVA1}: r = 32"), "metric_lr": (0.5, f"{IVA1}: 0.5"),
            "metric_epochs": (100, f"{IVA1}: 100 epochs"),
            "centres": (20, "ours: E = 20 (§IV-B fixes E = 20 while ablating r)"),
            "neighbours": (10, "Auto-FlexSwitch §IV-B: C = 10"),
            "routing": ("per-input", "Auto-FlexSwitch §III-C5: each input routed on its own"),
        },
    }),
    left_out={"glue": Setting(["stsb"], "Auto-FlexSwitch §IV-A3: seven GLUE classification tasks (no STS-B)")},
)

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (ORIGINAL, TSWITCH_CVPR2025, AUTO_FLEXSWITCH_2026)}


def get_protocol(protocol: str | Protocol | None) -> Protocol:
    """The protocol of that name (None: ``original``); UnknownNameError lists the valid ones."""
    if isinstance(protocol, Protocol):
        return protocol
    name = DEFAULT if protocol is None else protocol
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise UnknownNameError(f"unknown protocol {name!r}; valid protocols: {', '.join(PROTOCOLS)}") from None


def resolve_hyperparameters(protocol: Protocol, method: str, explicit: Mapping[str, Any] | None,
                            declared: Mapping[str, Any]) -> dict[str, Any]:
    """What a run passes to the method: the protocol's values for it, then ``explicit`` ones
    (``--hp``, a sweep's grid) on top. ``declared`` is the method's hyperparameter declarations:
    a protocol value the method does not declare is a bug in the protocol table."""
    values = protocol.values(method)
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise HyperparameterError(f"protocol {protocol.name!r} sets {', '.join(unknown)} for method {method!r}, "
                                  f"which has no such hyperparameter")
    return {**values, **(explicit or {})}


def sources(protocol: Protocol, method: str, declared: Mapping[str, Any]) -> Iterator[tuple[str, Any, str]]:
    """(hyperparameter, value, source) of every hyperparameter ``declared`` for ``method``
    under ``protocol``; one it does not set keeps ``original``'s value and source."""
    for name, spec in declared.items():
        setting = protocol.setting(method, name)
        if setting is not None:
            yield name, setting.value, setting.source
            continue
        kept = ORIGINAL.setting(method, name)
        source = kept.source if kept is not None else "mergebench default"
        yield name, spec.default, (source if protocol is ORIGINAL else f"as original: {source}")


def check_protocol(protocol: Protocol) -> None:
    """Every method a protocol names is registered, every value passes the method's typed
    hyperparameters and its own cross-checks, every suite of ``test_examples`` is registered
    with N >= 1; HyperparameterError / UnknownNameError otherwise."""
    from mergebench.registry import METHODS, SUITES

    for method in protocol.methods:
        cls = METHODS.get(method)
        values = resolve_hyperparameters(protocol, method, None, cls.hyperparameters)
        try:
            cls(**values)
        except HyperparameterError as error:
            raise HyperparameterError(f"protocol {protocol.name!r}: {error}") from None
    for suite, setting in protocol.test_examples.items():
        SUITES.get(suite)
        _check_count(protocol, f"test_examples[{suite!r}]", setting.value)
    if protocol.batch_size is not None:
        _check_count(protocol, "batch_size", protocol.batch_size.value)
    for suite, setting in protocol.left_out.items():
        names = [task.name for task in SUITES.get(suite).tasks]
        unknown = [name for name in setting.value if name not in names]
        if unknown or not set(names) - set(setting.value):
            raise HyperparameterError(f"protocol {protocol.name!r}: left_out[{suite!r}] = {setting.value!r} must name "
                                      f"some, not all, of the suite's tasks: {', '.join(names)}")


def _check_count(protocol: Protocol, what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HyperparameterError(f"protocol {protocol.name!r}: {what} = {value!r} is not an integer >= 1")


def differences() -> list[tuple[str, str, list[Setting | None]]]:
    """(method, hyperparameter, the Setting of every protocol in registry order) for each value
    that is not the same under every protocol; None: that protocol keeps ``original``'s."""
    rows = []
    for method, settings in ORIGINAL.methods.items():
        names = list(settings) + sorted({n for p in PROTOCOLS.values() for n in p.methods.get(method, {})} - set(settings))
        for name in names:
            chosen = [p.setting(method, name) if p is not ORIGINAL else settings.get(name) for p in PROTOCOLS.values()]
            effective = [json.dumps((s or settings.get(name) or Setting(None, "")).value) for s in chosen]
            if len(set(effective)) > 1:
                rows.append((method, name, chosen))
    return rows


def differences_markdown() -> str:
    """The README's table of the values that differ between protocols, each with its source."""
    names = list(PROTOCOLS)
    lines = ["| method | hyperparameter | " + " | ".join(f"`{n}`" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for method, name, chosen in differences():
        original = chosen[0]
        cells = []
        for setting in chosen:
            if setting is None:
                cells.append("(original)" if original is not None else "-")
            else:
                cells.append(f"{json.dumps(setting.value)}: {setting.source}")
        lines.append(f"| `{method}` | `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)
