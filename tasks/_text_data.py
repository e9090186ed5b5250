"""Six real-text classification tasks built offline from Debian packages.

The mini suite fine-tunes a small sentence encoder on each task, so the tasks
must be genuinely different (topic, language, software domain, part of speech,
noun and verb semantics) and need no network once the packages are installed.

Data sources (all from the Debian archive):

- ``fortune-topic``   /usr/share/games/fortunes/<category>  (package ``fortunes``):
  quotes separated by ``%`` lines; the category file is the label.
- ``word-language``   /usr/share/dict/<list>  (``wamerican``, ``wfrench``,
  ``wngerman``, ``wspanish``, ``witalian``, ``wportuguese``, ``wdutch``,
  ``wswedish``): three random words, labelled by the list's language.
- ``debian-section``  /var/lib/apt/lists/*_Packages[.lz4] joined with
  *_i18n_Translation-en[.lz4] (written by ``apt-get update`` with English
  translations enabled): package description -> archive section.
- ``wordnet-pos``, ``noun-supersense``, ``verb-supersense``
  /usr/share/wordnet/data.{noun,verb,adj,adv}  (``wordnet-base``, WordNet 3.0):
  gloss -> part of speech / lexicographer file.

Every builder is deterministic given its seed, keeps train and test disjoint
and class-balanced, and raises :class:`MissingDataError` naming the file and
the command that installs it.  Nothing is cached on disk: the caller caches.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from mergebench.errors import MissingResourceError

__all__ = [
    "APT_UPDATE_COMMAND",
    "DEBIAN_PACKAGES",
    "MissingDataError",
    "TEXT_TASKS",
    "TextDataset",
    "build_debian_section",
    "build_fortune_topic",
    "build_noun_supersense",
    "build_verb_supersense",
    "build_word_language",
    "build_wordnet_pos",
]

MAX_CHARS = 300  # the encoder sees 32 tokens; longer texts only cost memory

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

# Frequent sections with real prose descriptions; language ecosystems (perl,
# python, ...) name their label in the text and libs/doc are boilerplate.
DEBIAN_SECTIONS = ("devel", "fonts", "games", "graphics", "net", "science", "sound", "text")

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
WORDNET_POS = {"noun": "noun", "verb": "verb", "adjective": "adj", "adverb": "adv"}

DEBIAN_PACKAGES: tuple[str, ...] = (
    "fortunes",
    *(pkg for _, pkg in WORD_LISTS.values()),
    "wordnet-base",
)
# Docker images of Debian set Acquire::Languages "none"; the descriptions of
# debian-section live in the Translation-en lists, so ask for them explicitly.
APT_UPDATE_COMMAND = "apt-get update -o Acquire::Languages=en"


class MissingDataError(MissingResourceError):
    """A data file that an apt package provides is not on this machine."""


@dataclass(frozen=True)
class TextDataset:
    """A labelled text classification task: (text, label index) pairs."""

    name: str
    classes: tuple[str, ...]
    train: tuple[tuple[str, int], ...]
    test: tuple[tuple[str, int], ...]


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


def _split(
    name: str,
    classes: Sequence[str],
    texts: Mapping[str, Iterable[str]],
    n_train: int,
    n_test: int,
    seed: int,
) -> TextDataset:
    """Deduplicate, balance and split per-class texts into disjoint train/test.

    Texts seen under two classes are ambiguous and dropped.  Each class's
    texts are sorted before a seeded permutation so the split does not
    depend on file order.
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"{name}: n_train_per_class and n_test_per_class must be >= 1")
    unique = {c: {t for t in texts.get(c, ()) if t} for c in classes}
    seen = Counter(chain.from_iterable(unique.values()))
    rng = np.random.default_rng(seed)
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    for label, c in enumerate(classes):
        pool = sorted(t for t in unique[c] if seen[t] == 1)
        if len(pool) < n_train + n_test:
            raise ValueError(
                f"{name}: class {c!r} has {len(pool)} distinct examples, fewer than "
                f"n_train_per_class + n_test_per_class = {n_train} + {n_test}"
            )
        order = rng.permutation(len(pool))
        test += [(pool[i], label) for i in order[:n_test]]
        train += [(pool[i], label) for i in order[n_test : n_test + n_train]]
    return _dataset(name, classes, train, test, rng)


def _dataset(
    name: str,
    classes: Sequence[str],
    train: list[tuple[str, int]],
    test: list[tuple[str, int]],
    rng: np.random.Generator,
) -> TextDataset:
    """Shuffle so that classes interleave, and freeze."""
    train = [train[i] for i in rng.permutation(len(train))]
    test = [test[i] for i in rng.permutation(len(test))]
    return TextDataset(name, tuple(classes), tuple(train), tuple(test))


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


def build_fortune_topic(
    seed: int = 0,
    n_train_per_class: int = 400,
    n_test_per_class: int = 80,
    root: Path = Path("/usr/share/games/fortunes"),
) -> TextDataset:
    """English fortune cookies -> their category (6 topics)."""
    root = Path(root)
    texts = {}
    for cat in FORTUNE_CATEGORIES:
        path = root / cat
        if not path.is_file():
            raise _missing(path, f"fortune category {cat!r}", ["fortunes"])
        texts[cat] = _read_fortunes(path)
    return _split("fortune-topic", FORTUNE_CATEGORIES, texts, n_train_per_class, n_test_per_class, seed)


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


def build_word_language(
    seed: int = 0,
    n_train_per_class: int = 400,
    n_test_per_class: int = 60,
    root: Path = Path("/usr/share/dict"),
    words_per_example: int = 3,
    test_fraction: float = 0.2,
) -> TextDataset:
    """Three random words -> their language (8 word lists).

    Each vocabulary is split by a seeded permutation first, so test words
    never occur in training; words found in two lists are ambiguous and
    skipped.  Every word is used at most once.
    """
    root = Path(root)
    classes = tuple(WORD_LISTS)
    vocab, lowered = {}, {}
    for lang, (fname, pkg) in WORD_LISTS.items():
        path = root / fname
        if not path.is_file():
            raise _missing(path, f"{lang} word list", [pkg])
        vocab[lang], lowered[lang] = _read_words(path, lowercase=lang in _KEEP_CAPITALISED)

    rng = np.random.default_rng(seed)
    k = words_per_example
    train, test = [], []
    for label, lang in enumerate(classes):
        words, others = vocab[lang], [lowered[o] for o in classes if o != lang]
        order = rng.permutation(len(words))
        n_test_words = int(len(words) * test_fraction)
        used: set[str] = set()  # a word listed twice must not reach both splits
        for split, idx, n in (
            (test, order[:n_test_words], n_test_per_class),
            (train, order[n_test_words:], n_train_per_class),
        ):
            # walk the permuted part lazily: filters run on ~n*k words, not 400k
            picked = []
            for i in idx.tolist():
                w = words[i]
                if w in used or not _plain_word(w) or any(w in o for o in others):
                    continue
                used.add(w)
                picked.append(w)
                if len(picked) == n * k:
                    break
            if n < 1 or len(picked) < n * k:
                raise ValueError(
                    f"word-language: {lang!r} has {len(picked)} usable words for a "
                    f"split that needs {n} examples x {k} words"
                )
            split += [(" ".join(picked[j : j + k]), label) for j in range(0, n * k, k)]
    return _dataset("word-language", classes, train, test, rng)


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


def build_debian_section(
    seed: int = 0,
    n_train_per_class: int = 250,
    n_test_per_class: int = 60,
    lists_dir: Path = Path("/var/lib/apt/lists"),
) -> TextDataset:
    """Debian package description -> archive section (8 sections).

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
    for (section, _), (_, text) in reps.items():
        texts[section].append(text)
    return _split("debian-section", DEBIAN_SECTIONS, texts, n_train_per_class, n_test_per_class, seed)


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


def build_wordnet_pos(
    seed: int = 0,
    n_train_per_class: int = 750,
    n_test_per_class: int = 120,
    root: Path = Path("/usr/share/wordnet"),
) -> TextDataset:
    """WordNet 3.0 definition -> part of speech (noun, verb, adjective, adverb)."""
    texts = {name: [d for _, d in _read_wordnet(root, pos)] for name, pos in WORDNET_POS.items()}
    return _split("wordnet-pos", tuple(WORDNET_POS), texts, n_train_per_class, n_test_per_class, seed)


def _supersense(name, pos, lexfiles, seed, n_train, n_test, root) -> TextDataset:
    classes = tuple(LEXNAMES[i] for i in lexfiles)
    texts: dict[str, list[str]] = {c: [] for c in classes}
    for lex, definition in _read_wordnet(root, pos):
        if lex in lexfiles:
            texts[LEXNAMES[lex]].append(definition)
    return _split(name, classes, texts, n_train, n_test, seed)


def build_noun_supersense(
    seed: int = 0,
    n_train_per_class: int = 400,
    n_test_per_class: int = 60,
    root: Path = Path("/usr/share/wordnet"),
) -> TextDataset:
    """WordNet noun definition -> lexicographer file (8 noun supersenses)."""
    return _supersense(
        "noun-supersense", "noun", NOUN_SUPERSENSES, seed, n_train_per_class, n_test_per_class, root
    )


def build_verb_supersense(
    seed: int = 0,
    n_train_per_class: int = 400,
    n_test_per_class: int = 60,
    root: Path = Path("/usr/share/wordnet"),
) -> TextDataset:
    """WordNet verb definition -> lexicographer file (8 verb supersenses)."""
    return _supersense(
        "verb-supersense", "verb", VERB_SUPERSENSES, seed, n_train_per_class, n_test_per_class, root
    )


TEXT_TASKS: dict[str, Callable[..., TextDataset]] = {
    "fortune-topic": build_fortune_topic,
    "word-language": build_word_language,
    "debian-section": build_debian_section,
    "wordnet-pos": build_wordnet_pos,
    "noun-supersense": build_noun_supersense,
    "verb-supersense": build_verb_supersense,
}
