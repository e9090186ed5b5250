"""Eight real-text classification tasks built offline from Debian packages.

The mini suite fine-tunes a small sentence encoder on each task, so every task has its
own input domain (no input text is shared by two tasks, so a router can tell them
apart) and needs no network once the packages are installed.

Data sources (all from the Debian archive):

- ``fortune-topic``     /usr/share/games/fortunes/<category> (``fortunes``): quotes
  separated by ``%`` lines; the category file is the label.
- ``word-language``     /usr/share/dict/<list> (``wamerican``, ``wfrench``, ...): three
  words, labelled by the list's language; a word is used once, so test words never
  occur in training.
- ``debian-section``    /var/lib/apt/lists/*_Packages joined with *_i18n_Translation-en
  (``apt-get update -o Acquire::Languages=en``): package description -> archive section.
- ``noun-supersense``, ``verb-supersense``  /usr/share/wordnet/data.{noun,verb}
  (``wordnet-base``, WordNet 3.0): definition -> lexicographer file.
- ``unicode-category``  /usr/share/unicode/UnicodeData.txt (``unicode-data``):
  character name -> general category.
- ``bible-genre``       the King James Version through ``bible`` (``bible-kjv``,
  ``bible-kjv-text``): verse -> the group of books it belongs to (law, history, ...).
- ``code-language``     source files of Debian packages (Python standard library, Perl
  modules, C headers, Tcl/Tk library, jQuery/Underscore): one line of code -> language.

Each task is a *pool* of candidate texts per class; :func:`build_suite` removes every
text whose normalised form (lower-cased, whitespace collapsed: the encoder's tokenizer
is uncased) occurs under two classes or two tasks, keeps one text per normalised form,
and splits each class into disjoint test, validation and train parts (test and
validation balanced, train capped per class). Everything is deterministic given the
seed; a missing file raises :class:`MissingDataError` naming the package.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mergebench.errors import CorruptArtifactError, MissingResourceError

__all__ = [
    "APT_UPDATE_COMMAND",
    "DEBIAN_PACKAGES",
    "MissingDataError",
    "SPLITS",
    "Sizes",
    "TEXT_TASKS",
    "TextDataset",
    "TaskSource",
    "build_sources",
    "build_suite",
    "normalise",
]

MAX_CHARS = 300  # the encoder sees 32 tokens; longer texts only cost memory
SPLITS = ("train", "validation", "test")

FORTUNE_CATEGORIES = ("computers", "men-women", "politics", "science", "songs-poems", "work")

# language -> (file under /usr/share/dict, Debian package)
WORD_LISTS = {
    "english": ("american-english", "wamerican"),
    "french": ("french", "wfrench"),
    "german": ("ngerman", "wngerman"),
    "spanish": ("spanish", "wspanish"),
    "italian": ("italian", "witalian"),
    "portuguese": ("portuguese", "wportuguese"),
    "dutch": ("dutch", "wdutch"),
    "swedish": ("swedish", "wswedish"),
}
# German capitalises every noun, so capitals there are not proper nouns.
_KEEP_CAPITALISED = frozenset({"german"})

# The sections with enough real prose descriptions for the split sizes; language
# ecosystems (perl, python, ...) name their label in the text and libs/doc are boilerplate.
DEBIAN_SECTIONS = ("admin", "devel", "games", "net", "science", "sound", "utils")

# The standard WordNet lexnames table (lex_filenum -> lexicographer file), for
# the files used here.
LEXNAMES = {
    5: "noun.animal",
    6: "noun.artifact",
    8: "noun.body",
    13: "noun.food",
    15: "noun.location",
    18: "noun.person",
    20: "noun.plant",
    27: "noun.substance",
    29: "verb.body",
    31: "verb.cognition",
    32: "verb.communication",
    35: "verb.contact",
    36: "verb.creation",
    38: "verb.motion",
    40: "verb.possession",
    41: "verb.social",
}
NOUN_SUPERSENSES = (5, 6, 8, 13, 15, 18, 20, 27)
VERB_SUPERSENSES = (29, 31, 32, 35, 36, 38, 40, 41)

# Unicode general categories with enough named characters and real confusions
# (mathematical alphanumerics are letters, combining vowel signs are marks, ...).
UNICODE_CATEGORIES = {
    "Lu": "uppercase-letter",
    "Ll": "lowercase-letter",
    "Lo": "other-letter",
    "Mn": "nonspacing-mark",
    "So": "other-symbol",
    "Sm": "math-symbol",
}

# the book abbreviations `bible -f` prints, grouped by the traditional divisions
BIBLE_GENRES = {
    "law": "Ge Exo Lev Num Deu",
    "history": "Josh Jdgs Ruth 1Sm 2Sm 1Ki 2Ki 1Chr 2Chr Ezra Neh Est",
    "wisdom": "Job Psa Prv Eccl SSol",
    "major-prophets": "Isa Jer Lam Eze Dan",
    "minor-prophets": "Hos Joel Amos Obad Jonah Mic Nahum Hab Zep Hag Zec Mal",
    "gospels-acts": "Mat Mark Luke John Acts",
    "pauline-epistles": "Rom 1Cor 2Cor Gal Eph Phi Col 1Th 2Th 1Tim 2Tim Titus Phmn",
    "general-epistles": "Heb Jas 1Pet 2Pet 1Jn 2Jn 3Jn Jude Rev",
}
BIBLE_RANGE = "Gen1:1-Rev22:21"

# language -> (Debian packages whose files are read, file suffix)
CODE_LANGUAGES = {
    "python": (("libpython3.11-minimal", "libpython3.11-stdlib"), ".py"),
    "perl": (("perl-modules-5.36",), ".pm"),
    "c": (("libc6-dev", "linux-libc-dev"), ".h"),
    "tcl": (("libtcl8.6", "libtk8.6"), ".tcl"),
    "javascript": (("libjs-jquery", "libjs-underscore"), ".js"),
}

# licence of each source package, from its /usr/share/doc/<package>/copyright
LICENCES = {
    "fortunes": "BSD (the fortune program); quotations collected from many authors",
    "wamerican": "SCOWL: permissive (copyright notice kept), parts public domain",
    "wfrench": "GPL-2+",
    "wngerman": "GPL-2+",
    "wspanish": "public domain (word list)",
    "witalian": "GPL-3+",
    "wportuguese": "GPL-2+ or LGPL-2.1+ or MPL-1.1",
    "wdutch": "BSD-2-clause or CC-BY-3.0 (OpenTaal)",
    "wswedish": "GPL-2+",
    "wordnet-base": "WordNet 3.0 licence (permissive, Princeton University)",
    "unicode-data": "Unicode License (Unicode, Inc. data files)",
    "bible-kjv-text": "King James Version: public domain (copyright expired)",
    "bible-kjv": "GPL-2+ (the reader program)",
    "libpython3.11-minimal": "PSF-2.0",
    "libpython3.11-stdlib": "PSF-2.0",
    "perl-modules-5.36": "GPL-1+ or Artistic",
    "libc6-dev": "LGPL-2.1+",
    "linux-libc-dev": "GPL-2 (with the Linux syscall note)",
    "libtcl8.6": "Tcl/Tk licence (BSD-style)",
    "libtk8.6": "Tcl/Tk licence (BSD-style)",
    "libjs-jquery": "Expat (MIT)",
    "libjs-underscore": "Expat (MIT)",
    "debian-archive": "each package's own DFSG-free licence (Debian main)",
}

DEBIAN_PACKAGES: tuple[str, ...] = (
    "fortunes",
    *(pkg for _, pkg in WORD_LISTS.values()),
    "wordnet-base",
    "unicode-data",
    "bible-kjv",
    "bible-kjv-text",
    *dict.fromkeys(pkg for pkgs, _ in CODE_LANGUAGES.values() for pkg in pkgs),
)
# Docker images of Debian set Acquire::Languages "none"; the descriptions of
# debian-section live in the Translation-en lists, so ask for them explicitly.
APT_UPDATE_COMMAND = "apt-get update -o Acquire::Languages=en"


class MissingDataError(MissingResourceError):
    """A data file that an apt package provides is not on this machine."""


@dataclass(frozen=True)
class TextDataset:
    """A labelled text classification task: (text, label index) pairs per split."""

    name: str
    classes: tuple[str, ...]
    train: tuple[tuple[str, int], ...]
    validation: tuple[tuple[str, int], ...]
    test: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Sizes:
    """Examples per split: test and validation totals over the classes (balanced,
    rounded up to a multiple of the class count), train capped per class."""

    test: int = 2000
    validation: int = 500
    train_per_class: int = 500
    min_train_per_class: int = 100


@dataclass
class TaskSource:
    """A task's candidate texts per class and the Debian packages they came from."""

    classes: tuple[str, ...]
    texts: dict[str, list[str]]
    packages: tuple[str, ...]
    extra: dict[str, str] = field(default_factory=dict)  # provenance beyond package versions


def normalise(text: str) -> str:
    """The form two inputs must not share: lower-cased (the tokenizer is uncased), spaces collapsed."""
    return " ".join(text.lower().split())


# --------------------------------------------------------------------------- #
# shared helpers


def _missing(path: Path, what: str, packages: Sequence[str]) -> MissingDataError:
    return MissingDataError(
        f"{what} not found: {path}. Install it with: "
        f"apt-get update && apt-get install -y {' '.join(packages)}"
    )


def _read_text(path: Path) -> str:
    """Decode UTF-8, falling back to Latin-1 (wswedish ships ISO-8859-1)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _clean(text: str) -> str:
    """Collapse whitespace and cut at a word boundary near MAX_CHARS."""
    text = " ".join(text.split())
    if len(text) > MAX_CHARS:
        cut = text[:MAX_CHARS]
        text = cut.rsplit(" ", 1)[0] if " " in cut else cut
    return text


def _stable_hash(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


# --------------------------------------------------------------------------- #
# fortune-topic

_OVERSTRIKE = re.compile(r"[^\x08]\x08")


def _read_fortunes(path: Path) -> list[str]:
    """Quotes of one fortune file; typewriter overstrikes (x\\bx) resolved."""
    text = _read_text(path)
    while "\x08" in text:  # "___\b\b\bword" underlines: drop the struck char
        text, n = _OVERSTRIKE.subn("", text)
        if not n:
            text = text.replace("\x08", "")
    return [_clean(q) for q in re.split(r"^%[ \t]*$", text, flags=re.M)]


def fortune_topic(fortunes_dir: Path = Path("/usr/share/games/fortunes"), **_) -> TaskSource:
    """English fortune cookies -> their category (6 topics)."""
    root = Path(fortunes_dir)
    texts = {}
    for cat in FORTUNE_CATEGORIES:
        path = root / cat
        if not path.is_file():
            raise _missing(path, f"fortune category {cat!r}", ["fortunes"])
        texts[cat] = _read_fortunes(path)
    return TaskSource(FORTUNE_CATEGORIES, texts, ("fortunes",))


# --------------------------------------------------------------------------- #
# word-language


def _read_words(path: Path, lowercase: bool) -> tuple[list[str], set[str]]:
    """Lines of a word list in file order (not set order, which varies with
    string hashing), lower-cased where capitals do not mark proper nouns,
    and the set of all its lower-cased lines (to detect shared words)."""
    text = _read_text(path)
    lowered = text.lower()
    return (lowered if lowercase else text).split("\n"), set(lowered.split("\n"))


def _plain_word(w: str) -> bool:
    """Lower-case letters only: no possessives ('s), multi-word, hyphenated or
    numeric entries, and no proper nouns (capitalised, except in German)."""
    return len(w) >= 2 and w.isalpha() and w.islower()


def word_language(
    dict_dir: Path = Path("/usr/share/dict"), seed: int = 0, per_class: int = 1000, words_per_example: int = 3, **_
) -> TaskSource:
    """Three words -> their language (8 word lists).

    Each vocabulary is walked in a seeded order and every usable word is used once,
    so no word occurs in two examples (test words never occur in training); words
    found in two lists are ambiguous and skipped.
    """
    root = Path(dict_dir)
    classes = tuple(WORD_LISTS)
    vocab, lowered = {}, {}
    for lang, (fname, pkg) in WORD_LISTS.items():
        path = root / fname
        if not path.is_file():
            raise _missing(path, f"{lang} word list", [pkg])
        vocab[lang], lowered[lang] = _read_words(path, lowercase=lang in _KEEP_CAPITALISED)
    k = words_per_example
    texts = {}
    for lang in classes:
        words, others = vocab[lang], [lowered[o] for o in classes if o != lang]
        order = np.random.default_rng([seed, _stable_hash(lang)]).permutation(len(words))
        picked, used = [], set()
        for i in order.tolist():  # lazily: the filters run on ~per_class * k words, not 400k
            w = words[i]
            if w in used or not _plain_word(w) or any(w in o for o in others):
                continue
            used.add(w)
            picked.append(w)
            if len(picked) == per_class * k:
                break
        texts[lang] = [" ".join(picked[j : j + k]) for j in range(0, len(picked) - k + 1, k)]
    return TaskSource(classes, texts, tuple(pkg for _, pkg in WORD_LISTS.values()))


# --------------------------------------------------------------------------- #
# debian-section

# fields (with continuation lines) after a newline: the literal "\n" prefix
# lets the regex engine skip ahead, unlike "^" with re.M
_VALUE = r"[ \t]*(.*(?:\n[ \t].*)*)"
_PACKAGE_FIELD = re.compile(r"\n(Package|Source|Section|Description|Description-md5):" + _VALUE)
# Translation files list Package, Description-md5, Description-en in this order
_TRANSLATION = re.compile(r"\nDescription-md5:[ \t]*(\w+)\nDescription-en:" + _VALUE)
_COMPRESSED = (".lz4", ".gz", ".xz", ".zst", ".bz2")


def _list_files(lists_dir: Path, kind: str) -> list[Path]:
    """Apt list files of one kind (``Packages``, ``Translation-en``), plain or compressed."""
    paths = []
    for p in sorted(lists_dir.glob(f"*_{kind}*")):
        suffix = p.name[p.name.rindex(kind) + len(kind) :]
        if suffix == "" or suffix in _COMPRESSED:
            paths.append(p)
    return paths


def _cat_apt_list(path: Path) -> str:
    """Decompress with apt's own helper (no lz4 dependency); plain files are read."""
    if not path.name.endswith(_COMPRESSED):
        return _read_text(path)
    helper = shutil.which("apt-helper") or "/usr/lib/apt/apt-helper"
    if not Path(helper).exists():
        raise _missing(Path(helper), "apt-helper (to read compressed apt lists)", ["apt"])
    out = subprocess.run([helper, "cat-file", str(path)], capture_output=True, check=True)
    return out.stdout.decode("utf-8", errors="replace")


def _section_stanzas(text: str, sections: Iterable[str]) -> Iterable[dict[str, str]]:
    """Fields of the Packages stanzas whose Section is one of ``sections``.

    Stanzas are located by their Section line and only those are parsed:
    several times faster than parsing all ~60k stanzas of a Debian release.
    """
    names = "|".join(map(re.escape, sections))
    text = f"\n{text}\n"
    for m in re.finditer(rf"\nSection:[ \t]*(?:[\w-]+/)?(?:{names})[ \t]*(?=\n)", text):
        start = text.rfind("\n\n", 0, m.start() + 1) + 1
        end = text.find("\n\n", m.end())
        yield dict(_PACKAGE_FIELD.findall(text[start : end if end >= 0 else len(text)]))


def _description_text(desc: str) -> str:
    """Short description + start of the long one (' .' lines are paragraph breaks)."""
    short, _, long = desc.partition("\n")
    lines = [ln.strip() for ln in long.split("\n")]
    body = " ".join(ln for ln in lines if ln and ln != ".")
    short = short.strip().rstrip(".")
    return _clean(f"{short}. {body}" if body else short)


def _releases(lists_dir: Path) -> str:
    """The suites and dates of the apt lists read (their InRelease/Release headers)."""
    found = []
    for path in sorted(lists_dir.glob("*Release")):
        head = _read_text(path)[:4096]  # InRelease starts with a PGP header
        fields = dict(re.findall(r"^(Suite|Version|Date):[ \t]*(.*)$", head, flags=re.M))
        if fields:
            found.append(" ".join(f"{k}={fields[k]}" for k in ("Suite", "Version", "Date") if k in fields))
    return "; ".join(found)


def debian_section(lists_dir: Path = Path("/var/lib/apt/lists"), **_) -> TaskSource:
    """Debian package description -> archive section (7 sections).

    One package per (source package, section) so that near-identical
    descriptions of sibling binaries (foo, foo-data, ...) cannot straddle the
    train/test split; transitional and dummy packages are skipped.
    """
    lists_dir = Path(lists_dir)
    packages = _list_files(lists_dir, "Packages") if lists_dir.is_dir() else []
    if not packages:
        raise MissingDataError(
            f"no apt package lists (*_Packages[.lz4]) in {lists_dir}. "
            f"Fetch them with: {APT_UPDATE_COMMAND}"
        )
    by_md5: dict[str, str] = {}  # Description-md5 -> Description-en
    for path in _list_files(lists_dir, "Translation-en"):
        for md5, desc in _TRANSLATION.findall(f"\n{_cat_apt_list(path)}"):
            by_md5.setdefault(md5, desc)

    # (section, source) -> (representative's sort key, text)
    reps: dict[tuple[str, str], tuple[tuple, str]] = {}
    n_short_only = 0
    for path in packages:
        for st in _section_stanzas(_cat_apt_list(path), DEBIAN_SECTIONS):
            section = st["Section"].rsplit("/", 1)[-1]
            name = st.get("Package", "")
            desc = st.get("Description", "")
            if "\n" not in desc:  # modern lists: the long text is in Translation-en
                desc = by_md5.get(st.get("Description-md5", ""), desc)
            if "\n" not in desc:
                n_short_only += 1
                continue
            if re.search(r"transitional|dummy", desc.partition("\n")[0], re.I):
                continue
            source = st.get("Source", name).split()[0]
            key = (name != source, len(name), name)  # prefer the package named like its source
            slot = (section, source)
            if slot not in reps or key < reps[slot][0]:
                reps[slot] = (key, _description_text(desc))
    if not reps and n_short_only:
        raise MissingDataError(
            f"the apt lists in {lists_dir} hold no English long descriptions "
            f"(*_i18n_Translation-en[.lz4] missing). Fetch them with: {APT_UPDATE_COMMAND}"
        )
    texts: dict[str, list[str]] = {s: [] for s in DEBIAN_SECTIONS}
    for (section, _), (_, text) in sorted(reps.items()):
        texts[section].append(text)
    return TaskSource(DEBIAN_SECTIONS, texts, (), {"debian-archive": _releases(lists_dir)})


# --------------------------------------------------------------------------- #
# WordNet tasks

# a data line: offset, lex_filenum, ... " | " gloss; license lines start with "  "
_SYNSET = re.compile(r"\n\d{8} (\d\d) [^|\n]*\| ([^\n]*)")


def _read_wordnet(root: Path, pos: str) -> list[tuple[int, str]]:
    """(lex_filenum, definition) per synset of data.<pos>.

    Only the definition part of the gloss is kept: the quoted examples
    repeat the lemma, which would give the answer away.
    """
    path = Path(root) / f"data.{pos}"
    if not path.is_file():
        raise _missing(path, f"WordNet data file data.{pos}", ["wordnet-base"])
    out = []
    for lex, gloss in _SYNSET.findall(f"\n{_read_text(path)}"):
        quote = gloss.find('"')  # examples are quoted: 'definition; "example"'
        definition = gloss[:quote] if quote >= 0 else gloss
        out.append((int(lex), _clean(definition.rstrip(" ;:"))))
    return out


def _supersense(pos: str, lexfiles: Sequence[int], root: Path) -> TaskSource:
    classes = tuple(LEXNAMES[i] for i in lexfiles)
    texts: dict[str, list[str]] = {c: [] for c in classes}
    for lex, definition in _read_wordnet(root, pos):
        if lex in lexfiles:
            texts[LEXNAMES[lex]].append(definition)
    return TaskSource(classes, texts, ("wordnet-base",))


def noun_supersense(wordnet_dir: Path = Path("/usr/share/wordnet"), **_) -> TaskSource:
    """WordNet noun definition -> lexicographer file (8 noun supersenses)."""
    return _supersense("noun", NOUN_SUPERSENSES, wordnet_dir)


def verb_supersense(wordnet_dir: Path = Path("/usr/share/wordnet"), **_) -> TaskSource:
    """WordNet verb definition -> lexicographer file (8 verb supersenses)."""
    return _supersense("verb", VERB_SUPERSENSES, wordnet_dir)


# --------------------------------------------------------------------------- #
# unicode-category

# names derived from a code point (CJK COMPATIBILITY IDEOGRAPH-F900, TANGUT COMPONENT-001)
# carry a number, not a description
_NUMBERED_NAME = re.compile(r"-[0-9A-F]{3,}$")


def unicode_category(unicode_dir: Path = Path("/usr/share/unicode"), **_) -> TaskSource:
    """Unicode character name -> general category (6 categories)."""
    path = Path(unicode_dir) / "UnicodeData.txt"
    if not path.is_file():
        raise _missing(path, "the Unicode character database", ["unicode-data"])
    texts: dict[str, list[str]] = {c: [] for c in UNICODE_CATEGORIES.values()}
    for line in _read_text(path).splitlines():
        fields = line.split(";")
        if len(fields) < 3 or fields[1].startswith("<") or _NUMBERED_NAME.search(fields[1]):
            continue
        if fields[2] in UNICODE_CATEGORIES:
            texts[UNICODE_CATEGORIES[fields[2]]].append(_clean(fields[1]))
    return TaskSource(tuple(UNICODE_CATEGORIES.values()), texts, ("unicode-data",))


# --------------------------------------------------------------------------- #
# bible-genre

_VERSE = re.compile(r"^(\d?[A-Za-z]+)\d+:\d+ (.*)$", flags=re.M)


def parse_bible(text: str) -> TaskSource:
    """Verses as ``bible -f`` prints them ("Ge1:1 In the beginning ...") -> their genre."""
    genre_of = {book: genre for genre, books in BIBLE_GENRES.items() for book in books.split()}
    texts: dict[str, list[str]] = {g: [] for g in BIBLE_GENRES}
    for book, verse in _VERSE.findall(text):
        if book not in genre_of:
            raise ValueError(f"bible: unknown book abbreviation {book!r} in the verse list")
        texts[genre_of[book]].append(_clean(verse))
    return TaskSource(tuple(BIBLE_GENRES), texts, ("bible-kjv-text", "bible-kjv"))


def bible_genre(bible_program: str = "bible", **_) -> TaskSource:
    """King James Version verse -> the division of the Bible its book belongs to (8 groups)."""
    found = shutil.which(bible_program)
    if found is None:
        raise _missing(Path(bible_program), "the King James Bible reader", ["bible-kjv", "bible-kjv-text"])
    out = subprocess.run([found, "-f", BIBLE_RANGE], capture_output=True, check=True,
                         env={"COLUMNS": "100000", "PATH": "/usr/bin:/bin"})  # one verse per line
    return parse_bible(out.stdout.decode("utf-8", errors="replace"))


# --------------------------------------------------------------------------- #
# code-language

_COMMENT = re.compile(r"^(#|//|/\*|\*|--|;|=)")
_CODE_SYMBOL = re.compile(r"[(){}\[\]=$;:<>]")
# Perl's documentation: blocks from a POD command to =cut, and everything after __END__
_POD = re.compile(r"^=[a-z].*?(?:^=cut\b.*?$|\Z)|^__END__$.*", flags=re.M | re.S)


def _package_files(package: str, suffix: str, dpkg_info: Path) -> list[Path]:
    """The files of an installed package ending in ``suffix``, from dpkg's file list."""
    listing = Path(dpkg_info) / f"{package}.list"
    if not listing.is_file():
        arch = sorted(Path(dpkg_info).glob(f"{package}:*.list"))  # multi-arch packages
        if not arch:
            raise _missing(listing, f"the package {package}", [package])
        listing = arch[0]
    return [Path(p) for p in sorted(_read_text(listing).split("\n"))
            if p.endswith(suffix) and ".min." not in p and Path(p).is_file()]


def code_lines(text: str, perl: bool = False) -> list[str]:
    """Lines that look like code: 12-200 characters, a code symbol, no comment (nor, in
    Perl, documentation)."""
    if perl:
        text = _POD.sub("", text)
    out = []
    for line in text.split("\n"):
        line = " ".join(line.split())
        if 12 <= len(line) <= 200 and not _COMMENT.match(line) and _CODE_SYMBOL.search(line):
            out.append(line)
    return out


def code_language(dpkg_info: Path = Path("/var/lib/dpkg/info"), **_) -> TaskSource:
    """A line of source code -> its programming language (5 languages)."""
    texts: dict[str, list[str]] = {}
    for lang, (packages, suffix) in CODE_LANGUAGES.items():
        texts[lang] = [line for package in packages for path in _package_files(package, suffix, dpkg_info)
                       for line in code_lines(_read_text(path), perl=lang == "perl")]
    return TaskSource(tuple(CODE_LANGUAGES), texts,
                      tuple(pkg for pkgs, _ in CODE_LANGUAGES.values() for pkg in pkgs))


# --------------------------------------------------------------------------- #
# the suite

TEXT_TASKS: dict[str, Callable[..., TaskSource]] = {
    "fortune-topic": fortune_topic,
    "word-language": word_language,
    "debian-section": debian_section,
    "noun-supersense": noun_supersense,
    "verb-supersense": verb_supersense,
    "unicode-category": unicode_category,
    "bible-genre": bible_genre,
    "code-language": code_language,
}


def build_sources(seed: int = 0, **locations: Path) -> dict[str, TaskSource]:
    """Every task's pool, read from the installed packages (``locations``: a builder's
    keyword, e.g. ``lists_dir``, to read another copy)."""
    return {name: builder(seed=seed, **locations) for name, builder in TEXT_TASKS.items()}


def per_class(total: int, n_classes: int) -> int:
    """Examples per class for a balanced split of at least ``total``."""
    return math.ceil(total / n_classes)


def build_suite(
    sources: Mapping[str, TaskSource], seed: int = 0, sizes: Sizes = Sizes()
) -> dict[str, TextDataset]:
    """Split every task's pool into disjoint test, validation and train examples.

    A text whose normalised form occurs under two classes of a task (ambiguous) or in
    two tasks (a router could not tell them apart) is dropped everywhere; one text
    per normalised form is kept, so no input repeats within or across splits. Each
    class is sorted before a seeded permutation, so the split does not depend on
    file order; test and validation are balanced, train takes up to
    ``sizes.train_per_class`` of what is left.
    """
    keys: dict[str, dict[str, dict[str, str]]] = {}  # task -> class -> key -> text
    for task, source in sources.items():
        keys[task] = {}
        for c in source.classes:
            chosen: dict[str, str] = {}
            for text in source.texts.get(c, ()):
                key = normalise(text)
                if key and (key not in chosen or text < chosen[key]):
                    chosen[key] = text
            keys[task][c] = chosen
    tasks_of = Counter(k for by_class in keys.values() for k in set().union(*by_class.values()))
    out = {}
    for task, source in sources.items():
        classes_of = Counter(k for chosen in keys[task].values() for k in chosen)
        n_test = per_class(sizes.test, len(source.classes))
        n_val = per_class(sizes.validation, len(source.classes))
        rng = np.random.default_rng([seed, _stable_hash(task)])
        splits: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
        for label, c in enumerate(source.classes):
            pool = sorted(text for key, text in keys[task][c].items() if classes_of[key] == 1 and tasks_of[key] == 1)
            if len(pool) < n_test + n_val + sizes.min_train_per_class:
                raise ValueError(
                    f"{task}: class {c!r} has {len(pool)} distinct examples, fewer than "
                    f"test + validation + minimum train = {n_test} + {n_val} + {sizes.min_train_per_class}"
                )
            order = rng.permutation(len(pool))
            ends = {"test": n_test, "validation": n_test + n_val, "train": n_test + n_val + sizes.train_per_class}
            start = 0
            for split in ("test", "validation", "train"):
                splits[split] += [(pool[i], label) for i in order[start : ends[split]]]
                start = ends[split]
        done = {s: tuple(splits[s][i] for i in rng.permutation(len(splits[s]))) for s in SPLITS}  # classes interleave
        out[task] = TextDataset(task, tuple(source.classes), done["train"], done["validation"], done["test"])
    return out


# --------------------------------------------------------------------------- #
# pinned splits: gzip JSON lines and a manifest

MANIFEST = "manifest.json"


def split_file(task: str, split: str) -> str:
    return f"{task}.{split}.jsonl.gz"


def encode_split(examples: Sequence[tuple[str, int]]) -> bytes:
    """A split as JSON lines ({"label", "text"}), the bytes its SHA-256 is taken of."""
    return "".join(json.dumps({"label": label, "text": text}, ensure_ascii=False, sort_keys=True) + "\n"
                   for text, label in examples).encode("utf-8")


def decode_split(raw: bytes) -> tuple[tuple[str, int], ...]:
    rows = [json.loads(line) for line in raw.decode("utf-8").splitlines()]
    return tuple((row["text"], row["label"]) for row in rows)


def package_version(package: str) -> str | None:
    """The installed version of a Debian package (None: not installed, or no dpkg)."""
    dpkg = shutil.which("dpkg-query")
    if dpkg is None:
        return None
    out = subprocess.run([dpkg, "-W", "-f", "${Version}", package], capture_output=True, text=True)
    return out.stdout.strip() or None if out.returncode == 0 else None


def make_manifest(
    datasets: Mapping[str, TextDataset], sources: Mapping[str, TaskSource], seed: int, sizes: Sizes,
    version: Callable[[str], str | None] = package_version,
) -> tuple[dict, dict[str, bytes]]:
    """The manifest of built splits (SHA-256 of each split's JSON lines, the source packages
    with their versions and licences) and the uncompressed bytes of each split file."""
    files: dict[str, bytes] = {}
    tasks = {}
    for name, ds in datasets.items():
        source = sources[name]
        splits = {}
        for split in SPLITS:
            raw = encode_split(getattr(ds, split))
            files[split_file(name, split)] = raw
            splits[split] = {"file": split_file(name, split), "examples": len(getattr(ds, split)),
                             "sha256": hashlib.sha256(raw).hexdigest()}
        packages = [{"package": p, "version": version(p), "licence": LICENCES[p]} for p in source.packages]
        packages += [{"package": p, "version": v, "licence": LICENCES[p]} for p, v in sorted(source.extra.items())]
        tasks[name] = {"classes": list(ds.classes), "description": (TEXT_TASKS[name].__doc__ or "").split("\n")[0],
                       "sources": packages, "splits": splits}
    manifest = {
        "suite": "mini", "version": 2, "seed": seed, "sizes": asdict(sizes),
        "build": "python -m mergebench.tasks.mini build",
        "format": "per split: gzip JSON lines {label, text}; sha256 of the uncompressed lines",
        "rules": "no normalised text (lower-cased, spaces collapsed) in two tasks, two classes or two splits",
        "tasks": tasks,
    }
    return manifest, files


def write_data(out_dir: Path, manifest: dict, files: Mapping[str, bytes]) -> None:
    """Write the split files (gzip without a name or time stamp: byte-stable) and the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, raw in files.items():
        with open(out_dir / name, "wb") as handle, gzip.GzipFile("", "wb", 9, handle, mtime=0) as gz:
            gz.write(raw)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def read_manifest(data_dir: Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise MissingDataError(f"{path} is missing: reinstall mergebench, or rebuild the data with "
                               "`python -m mergebench.tasks.mini build`")
    return json.loads(path.read_text())


def manifest_hash(data_dir: Path) -> str:
    """SHA-256 of the manifest file: it pins every split, so it names the data a result was scored on."""
    path = Path(data_dir) / MANIFEST
    read_manifest(data_dir)  # a clear error if absent
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_split(data_dir: Path, manifest: Mapping, task: str, split: str) -> tuple[tuple[str, int], ...]:
    """One committed split, checked against its SHA-256 in the manifest."""
    entry = manifest["tasks"][task]["splits"][split]
    path = Path(data_dir) / entry["file"]
    if not path.is_file():
        raise MissingDataError(f"{path} is missing: reinstall mergebench, or rebuild the data with "
                               "`python -m mergebench.tasks.mini build`")
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as error:
        raise CorruptArtifactError(f"{path}: not a readable gzip file ({error})") from error
    if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
        raise CorruptArtifactError(f"{path}: its SHA-256 differs from {MANIFEST}; the data was changed. "
                                   "Rebuild it with `python -m mergebench.tasks.mini build`")
    return decode_split(raw)


def drift(old: Mapping, new: Mapping) -> list[str]:
    """One line per task split whose examples differ between two manifests, and per source
    package whose version differs (empty: the same data)."""
    lines = []
    for task in sorted(set(old.get("tasks", {})) | set(new.get("tasks", {}))):
        before, after = old.get("tasks", {}).get(task), new.get("tasks", {}).get(task)
        if before is None or after is None:
            lines.append(f"{task}: {'new' if before is None else 'removed'}")
            continue
        if before["classes"] != after["classes"]:
            lines.append(f"{task}: classes {before['classes']} -> {after['classes']}")
        for split in SPLITS:
            b, a = before["splits"][split], after["splits"][split]
            if b["sha256"] != a["sha256"]:
                lines.append(f"{task}/{split}: changed ({b['examples']} -> {a['examples']} examples)")
        versions = {s["package"]: s["version"] for s in before["sources"]}
        for s in after["sources"]:
            if versions.get(s["package"]) != s["version"]:
                lines.append(f"{task}: {s['package']} {versions.get(s['package'])} -> {s['version']}")
    return lines


def overlap_report(datasets: Mapping[str, Mapping[str, Sequence[tuple[str, int]]]]) -> list[str]:
    """Every broken rule of the built data: a normalised text in two tasks, in two splits of a
    task, or twice in one split (empty: none). ``datasets``: task -> split -> examples."""
    where: dict[str, set[tuple[str, str]]] = {}
    problems = []
    for task, splits in datasets.items():
        for split, examples in splits.items():
            keys = [normalise(text) for text, _ in examples]
            repeated = len(keys) - len(set(keys))
            if repeated:
                problems.append(f"{task}/{split}: {repeated} repeated texts")
            for key in set(keys):
                where.setdefault(key, set()).add((task, split))
    shared = Counter()
    for places in where.values():
        tasks = sorted({t for t, _ in places})
        if len(tasks) > 1:
            shared[" and ".join(tasks)] += 1
        elif len(places) > 1:
            shared[f"{tasks[0]}: {' and '.join(sorted(s for _, s in places))}"] += 1
    problems += [f"{pair}: {n} shared texts" for pair, n in sorted(shared.items())]
    return problems
