"""The eight Debian-text tasks, built from small fixtures in the real file formats
(fortune files, /usr/share/dict word lists, apt Packages/Translation lists, WordNet
data.* files, UnicodeData.txt, `bible -f` output, dpkg file lists), so the tests never
need the Debian packages; and the suite split, the pinned files and their manifest."""
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


import json


def small(test: int, validation: int, train: int) -> td.Sizes:
    return td.Sizes(test=test, validation=validation, train_per_class=train, min_train_per_class=1)


def split_one(name: str, source: td.TaskSource, sizes: td.Sizes, seed: int = 0) -> td.TextDataset:
    return td.build_suite({name: source}, seed=seed, sizes=sizes)[name]


def check_dataset(ds: td.TextDataset, n_test: int, n_val: int, n_train: int) -> None:
    """Balanced, labelled, non-empty, short; no normalised text twice in or across splits."""
    k = len(ds.classes)
    for split, n in (("test", n_test), ("validation", n_val), ("train", n_train)):
        examples = getattr(ds, split)
        assert Counter(label for _, label in examples) == {i: n for i in range(k)}, split
    texts = [t for t, _ in ds.train + ds.validation + ds.test]
    assert all(isinstance(t, str) and t and t == t.strip() and len(t) <= td.MAX_CHARS for t in texts)
    lowered = [" ".join(t.lower().split()) for t in texts]
    assert len(set(lowered)) == len(lowered)


# --------------------------------------------------------------------------- #
# fortune-topic


@pytest.fixture
def fortune_root(tmp_path: Path) -> Path:
    root = tmp_path / "fortunes"
    root.mkdir()
    for cat in td.FORTUNE_CATEGORIES:
        quotes = [f"Quote {i} about {cat}:\n\tsecond   line.\n\t\t-- Author {i}" for i in range(8)]
        quotes.append(quotes[0])  # duplicate quote: counted once
        quotes.append(quotes[1].upper())  # the same quote in capitals: counted once too
        quotes.append(f"The {cat} word  in _\b_\b_\b_\bbold, Ren'\be. " + "long " * 100)
        (root / cat).write_text("\n%\n".join(quotes) + "\n%\n")
        (root / f"{cat}.dat").write_bytes(b"\x00\x02binary")
    (root / "zippy").write_text("Yow!\n%\nAre we having fun yet?\n%\n")  # not a chosen category
    return root


def test_fortune_topic(fortune_root: Path) -> None:
    source = td.fortune_topic(fortunes_dir=fortune_root)
    assert source.classes == td.FORTUNE_CATEGORIES and source.packages == ("fortunes",)
    ds = split_one("fortune-topic", source, small(6 * 3, 6 * 2, 4))
    check_dataset(ds, 3, 2, 4)  # 9 distinct quotes per category: 3 + 2 + 4
    for text, label in ds.train + ds.validation + ds.test:
        cat = re.escape(ds.classes[label])  # the fixture names its category in every quote
        quote = rf"Quote (\d) about {cat}: second line\. -- Author \1"
        long = rf"The {cat} word in bold, Rene\.( long)+"  # overstrikes resolved, cut at a word
        assert re.fullmatch(quote, text, re.I) or re.fullmatch(long, text), text  # either case variant
    with pytest.raises(ValueError, match="'computers' has 9 distinct examples"):
        split_one("fortune-topic", source, small(6 * 5, 6 * 4, 4))
    (fortune_root / "politics").unlink()
    with pytest.raises(td.MissingDataError, match=r"politics.*apt-get install -y fortunes"):
        td.fortune_topic(fortunes_dir=fortune_root)


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
    source = td.word_language(dict_dir=dict_root, per_class=20)
    assert source.classes == ("english", "french", "german", "spanish", "italian", "portuguese", "dutch", "swedish")
    assert all(len(texts) == 20 for texts in source.texts.values())
    ds = split_one("word-language", source, small(8 * 3, 8 * 2, 6))
    check_dataset(ds, 3, 2, 6)
    split_words = []
    for split in (ds.train, ds.validation, ds.test):
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
    assert not split_words[0] & split_words[2] and not split_words[0] & split_words[1]  # unseen in training
    assert not set().union(*split_words) & {w.lower() for w in NOISE}
    assert td.word_language(dict_dir=dict_root, per_class=20) == source
    assert td.word_language(dict_dir=dict_root, per_class=20, seed=1) != source
    (dict_root / "ngerman").unlink()
    with pytest.raises(td.MissingDataError, match=r"ngerman.*apt-get install -y wngerman"):
        td.word_language(dict_dir=dict_root)


# --------------------------------------------------------------------------- #
# debian-section


def _stanza(**fields: str) -> str:
    return "".join(f"{k.replace('_', '-')}: {v}\n" for k, v in fields.items())


@pytest.fixture
def lists_dir(tmp_path: Path) -> Path:
    """A Packages list (short descriptions + md5), its Translation-en and an InRelease."""
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

    for section in td.DEBIAN_SECTIONS:
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
    (lists / "example.org_debian_dists_stable_InRelease").write_text(
        "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\nOrigin: Debian\nSuite: stable\nVersion: 12.9\n"
        "Date: Sat, 11 Jan 2025 10:00:00 UTC\n")
    (lists / "lock").write_text("")
    return lists


def test_debian_section(lists_dir: Path) -> None:
    source = td.debian_section(lists_dir=lists_dir)
    assert source.classes == td.DEBIAN_SECTIONS
    assert source.extra == {"debian-archive": "Suite=stable Version=12.9 Date=Sat, 11 Jan 2025 10:00:00 UTC"}
    k = len(td.DEBIAN_SECTIONS)
    # 2 + 2 + 3 uses all 7 sources of each section: nothing filtered can hide
    ds = split_one("debian-section", source, small(k * 2, k * 2, 3))
    check_dataset(ds, 2, 2, 3)
    for text, label in ds.train + ds.validation + ds.test:
        # short description + long one, paragraphs joined; never the -data sibling
        s = ds.classes[label]
        expected = rf"{s} program number (\d)\. The {s} tool \1 does things\. Second paragraph \1\."
        assert re.fullmatch(expected, text), text
    with pytest.raises(ValueError, match="class 'admin' has 7 distinct examples"):
        split_one("debian-section", source, small(k * 4, k * 3, 3))


@pytest.mark.skipif(not Path("/usr/lib/apt/apt-helper").exists(), reason="needs apt's apt-helper")
def test_debian_section_compressed_lists(lists_dir: Path) -> None:
    """Compressed lists are read through apt-helper cat-file, like the real .lz4 ones."""
    plain = td.debian_section(lists_dir=lists_dir)
    for path in list(lists_dir.glob("*_Packages")) + list(lists_dir.glob("*_Translation-en")):
        with path.open("rb") as src, gzip.open(f"{path}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        path.unlink()
    assert td.debian_section(lists_dir=lists_dir) == plain


def test_debian_section_errors(lists_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(td.MissingDataError, match="apt-get update"):
        td.debian_section(lists_dir=tmp_path / "nowhere")
    next(lists_dir.glob("*_Translation-en")).unlink()
    with pytest.raises(td.MissingDataError, match=r"Translation-en.*Acquire::Languages=en"):
        td.debian_section(lists_dir=lists_dir)


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
    }
    for pos, (ss_type, lexfiles) in files.items():
        rows = [
            (lex, f"{pos}lemma{lex}x{i}", f"{pos} meaning {i} of lexfile {lex}, spelled  out")
            for lex in lexfiles
            for i in range(6)
        ]
        # the same definition in two lexicographer files: ambiguous, dropped
        rows += [(lexfiles[0], f"{pos}lemmashared", "a shared definition"),
                 (lexfiles[1], f"{pos}lemmashared2", "a shared definition")]
        (root / f"data.{pos}").write_text(_synsets(ss_type, rows))
    return root


@pytest.mark.parametrize("build, pos, lexfiles", [
    (td.noun_supersense, "noun", td.NOUN_SUPERSENSES),
    (td.verb_supersense, "verb", td.VERB_SUPERSENSES),
])
def test_supersense(build, pos: str, lexfiles: tuple[int, ...], wordnet_root: Path) -> None:
    source = build(wordnet_dir=wordnet_root)
    assert source.classes == tuple(td.LEXNAMES[i] for i in lexfiles)
    assert all(c.startswith(pos + ".") for c in source.classes)
    ds = split_one(f"{pos}-supersense", source, small(8 * 2, 8 * 2, 2))
    check_dataset(ds, 2, 2, 2)
    for text, label in ds.train + ds.validation + ds.test:
        assert "lemma" not in text and '"' not in text and "example" not in text
        assert text.endswith(f"of lexfile {lexfiles[label]}, spelled out")
    with pytest.raises(ValueError, match="distinct examples"):
        split_one(f"{pos}-supersense", source, small(8 * 4, 8 * 2, 2))
    with pytest.raises(td.MissingDataError, match="apt-get install -y wordnet-base"):
        build(wordnet_dir=wordnet_root / "none")


# --------------------------------------------------------------------------- #
# unicode-category

UNICODE_ROWS = [
    "0041;LATIN CAPITAL LETTER A;Lu;0;L;;;;;N;;;;0061;",
    "0061;LATIN SMALL LETTER A;Ll;0;L;;;;;N;;;0041;;0041",
    "05D0;HEBREW LETTER ALEF;Lo;0;R;;;;;N;;;;;",
    "0300;COMBINING GRAVE ACCENT;Mn;230;NSM;;;;;N;NON-SPACING GRAVE;;;;",
    "00A9;COPYRIGHT SIGN;So;0;ON;<super> 0043;;;;N;;;;;",
    "002B;PLUS SIGN;Sm;0;ES;;;;;N;;;;;",
    "0030;DIGIT ZERO;Nd;0;EN;;0;0;0;N;;;;;",  # not a chosen category
    "3400;<CJK Ideograph Extension A, First>;Lo;0;L;;;;;N;;;;;",  # a range marker, no name
    "F900;CJK COMPATIBILITY IDEOGRAPH-F900;Lo;0;L;8C48;;;;N;;;;;",  # a name made of its code point
    "1D400;MATHEMATICAL BOLD CAPITAL A;Lu;0;L;<font> 0041;;;;N;;;;;",
]


def test_unicode_category(tmp_path: Path) -> None:
    (tmp_path / "UnicodeData.txt").write_text("\n".join(UNICODE_ROWS) + "\n")
    source = td.unicode_category(unicode_dir=tmp_path)
    assert source.classes == ("uppercase-letter", "lowercase-letter", "other-letter", "nonspacing-mark",
                              "other-symbol", "math-symbol")
    assert source.texts == {
        "uppercase-letter": ["LATIN CAPITAL LETTER A", "MATHEMATICAL BOLD CAPITAL A"],
        "lowercase-letter": ["LATIN SMALL LETTER A"], "other-letter": ["HEBREW LETTER ALEF"],
        "nonspacing-mark": ["COMBINING GRAVE ACCENT"], "other-symbol": ["COPYRIGHT SIGN"],
        "math-symbol": ["PLUS SIGN"],
    }
    with pytest.raises(td.MissingDataError, match="apt-get install -y unicode-data"):
        td.unicode_category(unicode_dir=tmp_path / "none")


# --------------------------------------------------------------------------- #
# bible-genre


def test_parse_bible() -> None:
    text = ("Ge1:1 In the beginning God created the heaven and the earth.\n"
            "Ps1:1 not a book of bible -f\n".replace("Ps1:1 not a book of bible -f\n", "")
            + "Psa23:1 The LORD is my shepherd; I shall not want.\n"
            "1Cor13:4 Charity suffereth long,   and is kind;\n"
            "Rev22:21 The grace of our Lord Jesus Christ be with you all. Amen.\n")
    source = td.parse_bible(text)
    assert source.classes == tuple(td.BIBLE_GENRES)
    assert {c: v for c, v in source.texts.items() if v} == {
        "law": ["In the beginning God created the heaven and the earth."],
        "wisdom": ["The LORD is my shepherd; I shall not want."],
        "pauline-epistles": ["Charity suffereth long, and is kind;"],
        "general-epistles": ["The grace of our Lord Jesus Christ be with you all. Amen."],
    }
    # all 66 books, each in one group
    books = [b for group in td.BIBLE_GENRES.values() for b in group.split()]
    assert len(books) == len(set(books)) == 66
    with pytest.raises(ValueError, match="unknown book abbreviation 'Xyz'"):
        td.parse_bible("Xyz1:1 Who?\n")
    with pytest.raises(td.MissingDataError, match="apt-get install -y bible-kjv bible-kjv-text"):
        td.bible_genre(bible_program="no-such-bible-reader")


# --------------------------------------------------------------------------- #
# code-language


def test_code_lines() -> None:
    python = "import os\n\n# a comment line (dropped)\ndef func(x):\n    return {'a':  x}  \nx\n" + "y = " * 60 + "1\n"
    assert td.code_lines(python) == ["def func(x):", "return {'a': x}"]
    perl = "my $x = shift;\n=head1 NAME\n\nFoo::Bar - does (things)\n\n=cut\nprint $value;\n__END__\n$after = 100;\n"
    assert td.code_lines(perl, perl=True) == ["my $x = shift;", "print $value;"]
    assert td.code_lines(perl) == ["my $x = shift;", "Foo::Bar - does (things)", "print $value;", "$after = 100;"]


def test_code_language(tmp_path: Path) -> None:
    info = tmp_path / "info"
    info.mkdir()
    for lang, (packages, suffix) in td.CODE_LANGUAGES.items():
        for n, package in enumerate(packages):
            source = tmp_path / f"{package}{suffix}"
            source.write_text(f"{lang}_call_{n}(arg);\n// comment();\n")
            skipped = tmp_path / f"{package}.min{suffix}"  # minified files are skipped
            skipped.write_text("minified(code);\n")
            name = f"{package}:amd64.list" if n else f"{package}.list"  # multi-arch lists too
            (info / name).write_text(f"/.\n{tmp_path}\n{source}\n{skipped}\n{tmp_path}/README\n")
    source = td.code_language(dpkg_info=info)
    assert source.classes == tuple(td.CODE_LANGUAGES)
    assert source.texts == {lang: [f"{lang}_call_{n}(arg);" for n in range(len(packages))]
                            for lang, (packages, _) in td.CODE_LANGUAGES.items()}
    (info / "libc6-dev.list").unlink()
    with pytest.raises(td.MissingDataError, match="apt-get install -y libc6-dev"):
        td.code_language(dpkg_info=info)


# --------------------------------------------------------------------------- #
# the suite split


def _source(classes: dict[str, list[str]], packages=("fortunes",)) -> td.TaskSource:
    return td.TaskSource(tuple(classes), {c: list(v) for c, v in classes.items()}, packages)


def test_build_suite_drops_shared_texts_and_splits_disjointly() -> None:
    a = {"x": [f"alpha {i}" for i in range(20)] + ["Shared  Text", "both classes"],
         "y": [f"beta {i}" for i in range(20)] + ["both classes", "BETA 0"]}  # "BETA 0": a case variant
    b = {"u": [f"gamma {i}" for i in range(20)] + ["shared text"], "v": [f"delta {i}" for i in range(20)]}
    built = td.build_suite({"a": _source(a), "b": _source(b)}, sizes=small(4, 2, 30))  # train: all the rest
    texts = {name: [t for split in td.SPLITS for t, _ in getattr(ds, split)] for name, ds in built.items()}
    assert "both classes" not in texts["a"]  # in two classes of one task
    assert not {"Shared  Text", "shared text"} & (set(texts["a"]) | set(texts["b"]))  # in two tasks
    assert sum(t.lower() == "beta 0" for t in texts["a"]) == 1  # one of the case variants, once
    for name, ds in built.items():
        check_dataset(ds, 2, 1, 17)  # 20 distinct texts left per class
        assert ds.classes == tuple(a if name == "a" else b)
    # labels follow the class order; class x holds the alpha texts
    assert all(t.startswith("alpha") == (label == 0) for t, label in built["a"].train)
    # deterministic; another seed draws other splits; order of the tasks does not matter
    again = td.build_suite({"b": _source(b), "a": _source(a)}, sizes=small(4, 2, 30))
    assert again == built
    assert td.build_suite({"a": _source(a), "b": _source(b)}, seed=1, sizes=small(4, 2, 30)) != built


def test_build_suite_caps_train_and_refuses_small_classes() -> None:
    classes = {"x": [f"x{i}" for i in range(30)], "y": [f"y{i}" for i in range(12)]}
    ds = td.build_suite({"t": _source(classes)}, sizes=td.Sizes(test=6, validation=4, train_per_class=15,
                                                                 min_train_per_class=2))["t"]
    assert Counter(label for _, label in ds.test) == {0: 3, 1: 3}
    assert Counter(label for _, label in ds.validation) == {0: 2, 1: 2}
    assert Counter(label for _, label in ds.train) == {0: 15, 1: 7}  # capped; the rest of y
    with pytest.raises(ValueError, match=r"t: class 'y' has 12 distinct examples, fewer than .* 3 \+ 2 \+ 8"):
        td.build_suite({"t": _source(classes)}, sizes=td.Sizes(test=6, validation=4, min_train_per_class=8))


# --------------------------------------------------------------------------- #
# pinned files, manifest, drift, overlap report


def test_pinned_files_round_trip_and_detect_changes(tmp_path: Path) -> None:
    classes = {"x": [f"x text {i} é" for i in range(12)], "y": [f"y text {i}" for i in range(12)]}
    sources = {"fortune-topic": _source(classes)}
    sizes = small(4, 2, 5)
    built = td.build_suite(sources, sizes=sizes)
    manifest, files = td.make_manifest(built, sources, 0, sizes, version=lambda p: "1.0")
    td.write_data(tmp_path, manifest, files)
    entry = manifest["tasks"]["fortune-topic"]
    assert entry["classes"] == ["x", "y"]
    assert entry["sources"] == [{"package": "fortunes", "version": "1.0", "licence": td.LICENCES["fortunes"]}]
    for split in td.SPLITS:
        path = tmp_path / f"fortune-topic.{split}.jsonl.gz"
        raw = gzip.decompress(path.read_bytes())
        rows = [json.loads(line) for line in raw.decode().splitlines()]
        expected = getattr(built["fortune-topic"], split)
        assert [(r["text"], r["label"]) for r in rows] == list(expected)
        assert entry["splits"][split] == {"file": path.name, "examples": len(expected),
                                          "sha256": hashlib.sha256(raw).hexdigest()}
        assert td.read_split(tmp_path, manifest, "fortune-topic", split) == expected
    first = (tmp_path / "fortune-topic.test.jsonl.gz").read_bytes()
    td.write_data(tmp_path, manifest, files)  # byte-stable: no time stamp in the gzip header
    assert (tmp_path / "fortune-topic.test.jsonl.gz").read_bytes() == first
    assert td.manifest_hash(tmp_path) == hashlib.sha256((tmp_path / "manifest.json").read_bytes()).hexdigest()
    assert td.drift(manifest, manifest) == []

    # a changed split file is refused, naming it
    changed = b'{"label": 0, "text": "planted"}\n' + files["fortune-topic.test.jsonl.gz"]
    (tmp_path / "fortune-topic.test.jsonl.gz").write_bytes(gzip.compress(changed))
    with pytest.raises(td.CorruptArtifactError, match=r"fortune-topic\.test\.jsonl\.gz: its SHA-256 differs"):
        td.read_split(tmp_path, manifest, "fortune-topic", "test")
    (tmp_path / "fortune-topic.train.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(td.CorruptArtifactError, match="not a readable gzip file"):
        td.read_split(tmp_path, manifest, "fortune-topic", "train")
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(td.MissingDataError, match="manifest.json is missing"):
        td.manifest_hash(tmp_path)

    # drift: a new package version and a changed split are reported
    rebuilt = td.build_suite(sources, seed=3, sizes=sizes)
    newer, _ = td.make_manifest(rebuilt, sources, 3, sizes, version=lambda p: "2.0")
    lines = td.drift(manifest, newer)
    assert "fortune-topic: fortunes 1.0 -> 2.0" in lines
    assert "fortune-topic/test: changed (4 -> 4 examples)" in lines
    assert td.drift({}, newer) == ["fortune-topic: new"]


def test_overlap_report_finds_each_broken_rule() -> None:
    clean = {"a": {"train": [("one", 0)], "test": [("two", 1)]}, "b": {"train": [("three", 0)]}}
    assert td.overlap_report(clean) == []
    broken = {"a": {"train": [("one", 0), ("One ", 1)], "test": [("Two", 1)]},
              "b": {"train": [("two", 0)], "test": [("four", 0)], "validation": [("FOUR", 1)]}}
    assert td.overlap_report(broken) == ["a/train: 1 repeated texts", "a and b: 1 shared texts",
                                         "b: test and validation: 1 shared texts"]


# --------------------------------------------------------------------------- #
# registry and missing data


def test_registry() -> None:
    assert list(td.TEXT_TASKS) == [
        "fortune-topic", "word-language", "debian-section", "noun-supersense", "verb-supersense",
        "unicode-category", "bible-genre", "code-language",
    ]
    assert {"fortunes", "wordnet-base", "wamerican", "wswedish", "unicode-data", "bible-kjv-text",
            "libc6-dev"} <= set(td.DEBIAN_PACKAGES)
    assert len(set(td.DEBIAN_PACKAGES)) == len(td.DEBIAN_PACKAGES)
    assert set(td.DEBIAN_PACKAGES) | {"debian-archive"} == set(td.LICENCES)  # every source has a licence
