"""The six Debian-text tasks, built from small fixtures in the real file formats
(fortune files, /usr/share/dict word lists, apt Packages/Translation lists,
WordNet data.* files), so the tests never need the Debian packages."""
from __future__ import annotations

import gzip
import hashlib
import shutil
from collections import Counter
from pathlib import Path

import re

import pytest

from mergebench.tasks import _text_data as td

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def check_dataset(ds: td.TextDataset, n_train: int, n_test: int) -> None:
    """Balanced, labelled, non-empty, short, and train/test disjoint."""
    k = len(ds.classes)
    assert len(ds.train) == k * n_train and len(ds.test) == k * n_test
    assert Counter(label for _, label in ds.train) == {i: n_train for i in range(k)}
    assert Counter(label for _, label in ds.test) == {i: n_test for i in range(k)}
    texts = [t for t, _ in ds.train + ds.test]
    assert all(isinstance(t, str) and t and t == t.strip() and len(t) <= td.MAX_CHARS for t in texts)
    assert len(set(texts)) == len(texts)  # no duplicates, so in particular disjoint


def check_seeds(build, **kwargs) -> None:
    assert build(seed=0, **kwargs) == build(seed=0, **kwargs)
    assert build(seed=0, **kwargs) != build(seed=1, **kwargs)


# --------------------------------------------------------------------------- #
# fortune-topic


@pytest.fixture
def fortune_root(tmp_path: Path) -> Path:
    root = tmp_path / "fortunes"
    root.mkdir()
    for cat in td.FORTUNE_CATEGORIES:
        quotes = [f"Quote {i} about {cat}:\n\tsecond   line.\n\t\t-- Author {i}" for i in range(8)]
        quotes.append(quotes[0])  # duplicate quote: counted once
        quotes.append(f"The {cat} word  in _\b_\b_\b_\bbold, Ren'\be. " + "long " * 100)
        (root / cat).write_text("\n%\n".join(quotes) + "\n%\n")
        (root / f"{cat}.dat").write_bytes(b"\x00\x02binary")
    (root / "zippy").write_text("Yow!\n%\nAre we having fun yet?\n%\n")  # not a chosen category
    return root


def test_fortune_topic(fortune_root: Path) -> None:
    ds = td.build_fortune_topic(n_train_per_class=5, n_test_per_class=3, root=fortune_root)
    assert ds.name == "fortune-topic" and ds.classes == td.FORTUNE_CATEGORIES
    check_dataset(ds, 5, 3)
    for text, label in ds.train + ds.test:
        cat = re.escape(ds.classes[label])  # the fixture names its category in every quote
        quote = rf"Quote (\d) about {cat}: second line\. -- Author \1"
        long = rf"The {cat} word in bold, Rene\.( long)+"  # overstrikes resolved, cut at a word
        assert re.fullmatch(quote, text) or re.fullmatch(long, text), text
    check_seeds(td.build_fortune_topic, n_train_per_class=5, n_test_per_class=3, root=fortune_root)


def test_fortune_topic_errors(fortune_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'computers' has 9 distinct examples"):
        td.build_fortune_topic(n_train_per_class=8, n_test_per_class=2, root=fortune_root)
    (fortune_root / "politics").unlink()
    with pytest.raises(td.MissingDataError, match=r"politics.*apt-get install -y fortunes"):
        td.build_fortune_topic(root=fortune_root)


# --------------------------------------------------------------------------- #
# word-language


def words_for(j: int, n: int = 120) -> list[str]:
    """n distinct alphabetic words; the first letter identifies the language."""
    return [LETTERS[j] + LETTERS[i // 26] + LETTERS[i % 26] for i in range(n)]


NOISE = ["dog's", "Paris", "ad hoc", "well-known", "x", "route66", "", "shared"]


@pytest.fixture
def dict_root(tmp_path: Path) -> Path:
    root = tmp_path / "dict"
    root.mkdir()
    for j, (lang, (fname, _)) in enumerate(td.WORD_LISTS.items()):
        words = words_for(j)
        if lang == "german":  # capitalised nouns are kept, lower-cased
            words = [w.capitalize() for w in words]
        if lang == "swedish":  # wswedish is ISO-8859-1
            words = [w + "ö" for w in words]
        lines = words + words[:3] + NOISE  # repeated lines are used once
        data = "\n".join(lines) + "\n"
        (root / fname).write_bytes(data.encode("latin-1" if lang == "swedish" else "utf-8"))
    return root


def test_word_language(dict_root: Path) -> None:
    ds = td.build_word_language(n_train_per_class=6, n_test_per_class=3, root=dict_root)
    assert ds.name == "word-language"
    assert ds.classes == (
        "english", "french", "german", "spanish", "italian", "portuguese", "dutch", "swedish"
    )
    check_dataset(ds, 6, 3)
    split_words = []
    for split in (ds.train, ds.test):
        words = Counter()
        for text, label in split:
            ws = text.split(" ")
            assert len(ws) == 3
            assert all(w[0] == LETTERS[label] and w.isalpha() and w.islower() for w in ws)
            if ds.classes[label] == "swedish":
                assert all(w.endswith("ö") for w in ws)
            words.update(ws)
        assert max(words.values()) == 1  # every word used once
        split_words.append(set(words))
    assert not split_words[0] & split_words[1]  # test words never seen in training
    assert not (split_words[0] | split_words[1]) & {w.lower() for w in NOISE}
    check_seeds(td.build_word_language, n_train_per_class=6, n_test_per_class=3, root=dict_root)


def test_word_language_errors(dict_root: Path) -> None:
    with pytest.raises(ValueError, match="'english' has .* usable words"):
        td.build_word_language(n_train_per_class=40, n_test_per_class=3, root=dict_root)
    (dict_root / "ngerman").unlink()
    with pytest.raises(td.MissingDataError, match=r"ngerman.*apt-get install -y wngerman"):
        td.build_word_language(root=dict_root)


# --------------------------------------------------------------------------- #
# debian-section


def _stanza(**fields: str) -> str:
    return "".join(f"{k.replace('_', '-')}: {v}\n" for k, v in fields.items())


@pytest.fixture
def lists_dir(tmp_path: Path) -> Path:
    """A Packages list (short descriptions + md5) and its Translation-en."""
    packages, translations = [], []

    def add(name: str, section: str, short: str, long: str, source: str | None = None) -> None:
        desc = f"{short}\n{long}"
        md5 = hashlib.md5(desc.encode()).hexdigest()
        extra = {"Source": f"{source} (1.0-1)"} if source else {}
        stanza = (
            _stanza(Package=name, **extra, Version="1.0-1", Architecture="amd64",
                    Description=short, Description_md5=md5)
            + "Tag: role::program,\n use::browsing\n"
            + _stanza(Priority="optional", Filename=f"pool/main/{name}.deb")
        )
        # deb822 fixes no field order: put Section first now and then
        section_line = _stanza(Section=section)
        first = len(packages) % 3 == 0
        packages.append(section_line + stanza if first else stanza + section_line)
        translations.append(_stanza(Package=name, Description_md5=md5, Description_en=desc))

    for j, section in enumerate(td.DEBIAN_SECTIONS):
        for i in range(7):
            name = f"{section}-tool{i}"
            prefix = "contrib/" if i == 0 else ""
            add(name, prefix + section, f"{section} program number {i}",
                f" The {section} tool {i} does things.\n .\n Second  paragraph {i}.")
            # a sibling binary of the same source (short name, near-duplicate text):
            # one package per source, the one named like it
            add(f"{section[:2]}{i}", section, f"{section} program number {i} (data files)",
                f" The {section} tool {i} does things.", source=name)
    add("oldtool", "devel", "transitional dummy package", " It can be removed.")
    add("libfoo1", "libs", "foo library", " Shared library for foo.")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "example.org_debian_dists_stable_main_binary-amd64_Packages").write_text("\n".join(packages))
    (lists / "example.org_debian_dists_stable_main_i18n_Translation-en").write_text("\n".join(translations))
    (lists / "example.org_debian_dists_stable_InRelease").write_text("not a list\n")
    (lists / "lock").write_text("")
    return lists


def test_debian_section(lists_dir: Path) -> None:
    # 5 + 2 uses all 7 sources of each section: nothing filtered can hide
    ds = td.build_debian_section(n_train_per_class=5, n_test_per_class=2, lists_dir=lists_dir)
    assert ds.name == "debian-section" and ds.classes == td.DEBIAN_SECTIONS
    check_dataset(ds, 5, 2)
    for text, label in ds.train + ds.test:
        # short description + long one, paragraphs joined; never the -data sibling
        s = ds.classes[label]
        expected = rf"{s} program number (\d)\. The {s} tool \1 does things\. Second paragraph \1\."
        assert re.fullmatch(expected, text), text
    check_seeds(td.build_debian_section, n_train_per_class=5, n_test_per_class=2, lists_dir=lists_dir)


@pytest.mark.skipif(not Path("/usr/lib/apt/apt-helper").exists(), reason="needs apt's apt-helper")
def test_debian_section_compressed_lists(lists_dir: Path) -> None:
    """Compressed lists are read through apt-helper cat-file, like the real .lz4 ones."""
    plain = td.build_debian_section(n_train_per_class=4, n_test_per_class=2, lists_dir=lists_dir)
    for path in list(lists_dir.glob("*_Packages")) + list(lists_dir.glob("*_Translation-en")):
        with path.open("rb") as src, gzip.open(f"{path}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        path.unlink()
    assert td.build_debian_section(n_train_per_class=4, n_test_per_class=2, lists_dir=lists_dir) == plain


def test_debian_section_errors(lists_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="class 'devel' has 7 distinct examples"):
        td.build_debian_section(n_train_per_class=6, n_test_per_class=2, lists_dir=lists_dir)
    with pytest.raises(td.MissingDataError, match="apt-get update"):
        td.build_debian_section(lists_dir=tmp_path / "nowhere")
    next(lists_dir.glob("*_Translation-en")).unlink()
    with pytest.raises(td.MissingDataError, match=r"Translation-en.*Acquire::Languages=en"):
        td.build_debian_section(lists_dir=lists_dir)


# --------------------------------------------------------------------------- #
# WordNet tasks

LICENSE = (
    "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    "  2 Princeton University under the following license.  |  By obtaining, using  \n"
)


def _synsets(ss_type: str, rows: list[tuple[int, str, str]]) -> str:
    """data.<pos> text: rows of (lex_filenum, lemma, definition); each gloss
    also carries a quoted example that repeats the lemma."""
    lines = [
        f"{1000 + 97 * i:08d} {lex:02d} {ss_type} 01 {lemma} 0 001 @ 00001740 {ss_type} 0000"
        f" | {definition}; \"an example of {lemma}\"  "
        for i, (lex, lemma, definition) in enumerate(rows)
    ]
    return LICENSE + "\n".join(lines) + "\n"


@pytest.fixture
def wordnet_root(tmp_path: Path) -> Path:
    root = tmp_path / "wordnet"
    root.mkdir()
    files = {
        "noun": ("n", [*td.NOUN_SUPERSENSES, 3]),  # 03 noun.Tops is not a chosen class
        "verb": ("v", [*td.VERB_SUPERSENSES, 43]),  # 43 verb.weather neither
        "adj": ("s", [0]),
        "adv": ("r", [2]),
    }
    for pos, (ss_type, lexfiles) in files.items():
        rows = [
            (lex, f"{pos}lemma{lex}x{i}", f"{pos} meaning {i} of lexfile {lex}, spelled  out")
            for lex in lexfiles
            for i in range(6)
        ]
        if pos in ("noun", "verb"):  # the same definition under two parts of speech
            rows.append((lexfiles[-1], f"{pos}lemmashared", "a definition shared by noun and verb"))
        (root / f"data.{pos}").write_text(_synsets(ss_type, rows))
    return root


def _no_lemma_or_example(ds: td.TextDataset) -> None:
    for text, _ in ds.train + ds.test:
        assert "lemma" not in text and '"' not in text and "example" not in text
        assert not text.endswith((";", " "))


def test_wordnet_pos(wordnet_root: Path) -> None:
    ds = td.build_wordnet_pos(n_train_per_class=3, n_test_per_class=2, root=wordnet_root)
    assert ds.name == "wordnet-pos" and ds.classes == ("noun", "verb", "adjective", "adverb")
    check_dataset(ds, 3, 2)
    _no_lemma_or_example(ds)
    for text, label in ds.train + ds.test:
        assert text.startswith(td.WORDNET_POS[ds.classes[label]] + " meaning ")
        assert "spelled out" in text
    assert "a definition shared by noun and verb" not in {t for t, _ in ds.train + ds.test}
    check_seeds(td.build_wordnet_pos, n_train_per_class=3, n_test_per_class=2, root=wordnet_root)
    with pytest.raises(ValueError, match="'adjective' has 6 distinct examples"):
        td.build_wordnet_pos(n_train_per_class=5, n_test_per_class=2, root=wordnet_root)


@pytest.mark.parametrize(
    "build, pos, lexfiles",
    [
        (td.build_noun_supersense, "noun", td.NOUN_SUPERSENSES),
        (td.build_verb_supersense, "verb", td.VERB_SUPERSENSES),
    ],
)
def test_supersense(build, pos: str, lexfiles: tuple[int, ...], wordnet_root: Path) -> None:
    ds = build(n_train_per_class=4, n_test_per_class=2, root=wordnet_root)
    assert ds.name == f"{pos}-supersense"
    assert ds.classes == tuple(td.LEXNAMES[i] for i in lexfiles)
    assert all(c.startswith(pos + ".") for c in ds.classes)
    check_dataset(ds, 4, 2)
    _no_lemma_or_example(ds)
    for text, label in ds.train + ds.test:
        assert text.endswith(f"of lexfile {lexfiles[label]}, spelled out")
    check_seeds(build, n_train_per_class=4, n_test_per_class=2, root=wordnet_root)
    with pytest.raises(ValueError, match="distinct examples"):
        build(n_train_per_class=6, n_test_per_class=2, root=wordnet_root)


# --------------------------------------------------------------------------- #
# registry and missing data


def test_registry() -> None:
    assert list(td.TEXT_TASKS) == [
        "fortune-topic", "word-language", "debian-section",
        "wordnet-pos", "noun-supersense", "verb-supersense",
    ]
    assert {"fortunes", "wordnet-base", "wamerican", "wswedish"} <= set(td.DEBIAN_PACKAGES)
    assert len(set(td.DEBIAN_PACKAGES)) == len(td.DEBIAN_PACKAGES) == 10


@pytest.mark.parametrize(
    "task, keyword, package",
    [
        ("fortune-topic", "root", "fortunes"),
        ("word-language", "root", "wamerican"),
        ("debian-section", "lists_dir", "apt-get update"),
        ("wordnet-pos", "root", "wordnet-base"),
        ("noun-supersense", "root", "wordnet-base"),
        ("verb-supersense", "root", "wordnet-base"),
    ],
)
def test_missing_data(task: str, keyword: str, package: str, tmp_path: Path) -> None:
    missing = tmp_path / "not-installed"
    with pytest.raises(td.MissingDataError) as error:
        td.TEXT_TASKS[task](**{keyword: missing})
    message = str(error.value)
    assert str(missing) in message and package in message
    if package != "apt-get update":
        assert f"apt-get install -y {package}" in message
