"""Build the bundled sample corpus under ``data/sample/``.

Run it from anywhere as ``python data/build_sample.py``. It needs only the standard library and pyarrow,
never touches the network, and writes three files:

* ``sample/pydoc.parquet``: one document per topic of ``pydoc_data.topics`` (the Python reference docs);
* ``sample/code.jsonl``: a fixed, evenly spread selection of standard-library source files;
* ``sample/multilingual.jsonl``: real non-English text found on a Debian 12 machine: translated manual
  pages and gettext message catalogues of public-domain or permissively licensed projects.

It then refreshes the generated blocks of ``data/README.md`` (counts, sizes, per-document provenance).

The output is deterministic for a given Python version (``pydoc_data`` and the standard library change
between versions), pyarrow version (Parquet metadata names its writer) and set of Debian package versions
(recorded per document in the README).
"""

from __future__ import annotations

import argparse
import gettext
import gzip
import json
import re
import sys
import sysconfig
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

DATA_DIR = Path(__file__).resolve().parent
OUT_DIR = DATA_DIR / "sample"
README = DATA_DIR / "README.md"

PYDOC_FILE = "pydoc.parquet"
CODE_FILE = "code.jsonl"
MULTILINGUAL_FILE = "multilingual.jsonl"

PYDOC_ROW_GROUP_SIZE = 16  # 79 topics on 3.11 -> 5 row groups, so row-group sharding has work to do
CODE_DOC_COUNT = 150
CODE_MAX_BYTES = 60 * 1024
CODE_SKIP_DIRS = frozenset({"__pycache__", "site-packages", "test", "tests", "idle_test", "ensurepip", "turtledemo"})
CODE_SKIP_PREFIXES = ("config-", "_sysconfigdata")  # build-machine specific, not portable source

MAN_ROOT = Path("/usr/share/man")
LOCALE_ROOT = Path("/usr/share/locale")
DPKG_INFO = Path("/var/lib/dpkg/info")
DPKG_STATUS = Path("/var/lib/dpkg/status")
MIN_CATALOGUE_CHARS = 200
_PRINTF = re.compile(r"%(?:\d+\$)?[-+ #0'I]*(?:\*|\d+)?(?:\.(?:\*|\d+))?(?:hh|h|ll|l|L|q|j|z|t)?[a-zA-Z%]")


@dataclass(frozen=True)
class Doc:
    """One corpus document; the field order is the column order of every output file."""

    id: str
    title: str
    text: str
    source: str
    lang: str


@dataclass(frozen=True)
class Provenance:
    """Where one multilingual document came from."""

    doc_id: str
    lang: str
    path: Path
    package: str
    version: str
    license: str


# --------------------------------------------------------------------------------------------------
# pydoc topics
# --------------------------------------------------------------------------------------------------


def pydoc_docs() -> list[Doc]:
    """One English document per ``pydoc_data.topics`` entry, sorted by topic name."""
    from pydoc_data.topics import topics

    return [
        Doc(f"pydoc:{name}", name, topics[name].strip(), "pydoc", "en")
        for name in sorted(topics)
        if topics[name].strip()
    ]


def write_parquet(docs: list[Doc], path: Path, row_group_size: int) -> None:
    """Write documents as a Parquet table of string columns with small row groups."""
    schema = pa.schema([(f.name, pa.string()) for f in fields(Doc)])
    table = pa.Table.from_pylist([asdict(d) for d in docs], schema=schema)
    pq.write_table(table, path, row_group_size=row_group_size, compression="snappy")


# --------------------------------------------------------------------------------------------------
# standard-library code
# --------------------------------------------------------------------------------------------------


def stdlib_candidates(root: Path) -> list[Path]:
    """Every ``.py`` file under the stdlib root, minus tests, vendored and build-specific files."""
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if CODE_SKIP_DIRS.intersection(rel.parts[:-1]) or rel.parts[0].startswith(CODE_SKIP_PREFIXES):
            continue
        found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def read_code(path: Path) -> str | None:
    """The file's text, or None if it is too big, not UTF-8, or blank."""
    data = path.read_bytes()
    if len(data) > CODE_MAX_BYTES:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.strip() else None


def spread(items: list[Path], count: int) -> list[Path]:
    """``count`` items evenly spaced over ``items`` (all of them if there are fewer)."""
    if len(items) <= count:
        return list(items)
    return [items[(i * len(items)) // count] for i in range(count)]


def code_docs(root: Path, count: int = CODE_DOC_COUNT) -> list[Doc]:
    """Code documents for an evenly spread selection of eligible stdlib files."""
    eligible = [(p, t) for p in stdlib_candidates(root) if (t := read_code(p)) is not None]
    chosen = set(spread([p for p, _ in eligible], count))
    return [
        Doc(f"code:{p.relative_to(root).as_posix()}", p.name, t, "stdlib-code", "python")
        for p, t in eligible
        if p in chosen
    ]


# --------------------------------------------------------------------------------------------------
# roff (man page) to plain text
# --------------------------------------------------------------------------------------------------

_NAMED_CHARS = {
    "bu": "•", "aq": "'", "dq": '"', "en": "–", "em": "—", "hy": "-", "mi": "−", "lq": "“", "rq": "”",
    "oq": "‘", "cq": "’", "Fo": "«", "Fc": "»", "Bq": "„", "bq": "‚", "fo": "‹", "fc": "›", "ss": "ß",
    "ae": "æ", "AE": "Æ", "/l": "ł", "/L": "Ł", "/o": "ø", "/O": "Ø", "oa": "å", "oA": "Å", "aa": "´",
    "ga": "`", "co": "©", "rg": "®", "tm": "™", "de": "°", "mu": "×", "+-": "±", "->": "→", "<-": "←",
    "ba": "|", "rs": "\\", "ti": "~", "ha": "^", "at": "@", "sh": "#", "Do": "$", "sl": "/", "lB": "[",
    "rB": "]", "lC": "{", "rC": "}", "la": "⟨", "ra": "⟩", "<=": "≤", ">=": "≥", "!=": "≠", "sc": "§",
}  # fmt: skip
_ACCENTS = {":": "\u0308", "'": "\u0301", "`": "\u0300", "^": "\u0302", ",": "\u0327", "~": "\u0303",
            "v": "\u030c", "o": "\u030a"}  # fmt: skip
_STRINGS = {"Aq": "'", "AQ": "'", "lq": "“", "rq": "”", "R": "®", "Tm": "™"}
_SIZE_ARG = re.compile(r"[-+]?\d+|\(\d\d|\[[^]]*\]")
_QUOTED_ARG = re.compile(r"'[^']*'")
_LIST_MARK = re.compile(r"[•·*–-]|\d{1,2}[.)]?|[a-zA-Z][.)]")
_REQUEST_ARGS = re.compile(r'"((?:[^"]|"")*)"|(\S+)')


def named_char(name: str) -> str:
    """Render a groff special character such as ``\\(bu``, ``\\(:u`` or ``\\[u00E9]``."""
    if name in _NAMED_CHARS:
        return _NAMED_CHARS[name]
    if len(name) == 2 and name[0] in _ACCENTS:
        return unicodedata.normalize("NFC", name[1] + _ACCENTS[name[0]])
    if re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
        return chr(int(name[1:], 16))
    return ""


def _bracketed(s: str, i: int) -> tuple[str, int]:
    """Read a groff name at ``s[i]``: ``(xx``, ``[long]`` or one character; return it and the end index."""
    if s.startswith("(", i):
        return s[i + 1 : i + 3], i + 3
    if s.startswith("[", i):
        end = s.find("]", i)
        end = len(s) - 1 if end < 0 else end
        return s[i + 1 : end], end + 1
    return s[i : i + 1], i + 1


def unescape(s: str, strings: dict[str, str]) -> str:
    """Turn one line of roff text into plain text (fonts, sizes and motions dropped)."""
    out: list[str] = []
    i = 0
    while i < len(s):
        ch = s[i]
        if ch != "\\" or i + 1 == len(s):
            out.append(ch)
            i += 1
            continue
        esc = s[i + 1]
        i += 2
        if esc == '"':
            break
        if esc == "f":
            _, i = _bracketed(s, i)
        elif esc == "(" or esc == "[":
            name, i = _bracketed(s, i - 1)
            out.append(named_char(name))
        elif esc == "*":
            name, i = _bracketed(s, i)
            out.append(strings.get(name, ""))
        elif esc == "s":
            m = _SIZE_ARG.match(s, i)
            i = m.end() if m else i
        elif esc in "hvwlLoDbXZ":
            m = _QUOTED_ARG.match(s, i)
            i = m.end() if m else i
        elif esc in "nkgm":
            _, i = _bracketed(s, i + (1 if esc == "n" and s[i : i + 1] in "+-" else 0))
        elif esc in "&|^%c{}\n":
            pass
        elif esc in " ~0":
            out.append(" ")
        elif esc == "e":
            out.append("\\")
        else:  # \- \. \' \` and unknown escapes print the character itself, as groff does
            out.append({"'": "´", "`": "`"}.get(esc, esc))
    return "".join(out)


def request_args(rest: str) -> list[str]:
    """Split the arguments of a roff request, honouring double quotes."""
    return [q.replace('""', '"') if q or not bare else bare for q, bare in _REQUEST_ARGS.findall(rest)]


def _wide(ch: str) -> bool:
    return unicodedata.east_asian_width(ch) in ("W", "F")


class RoffText:
    """A small man(7)/tbl(1) renderer to unwrapped paragraphs, enough for DocBook and po4a pages."""

    def __init__(self) -> None:
        self.blocks: list[str] = []
        self.para: list[str] = []
        self.strings = dict(_STRINGS)
        self.fill = True
        self.glue = False  # previous text line ended in \c
        self.tag_next = False  # .TP: the next text line is the tag
        self.prefix = ""  # .IP/.TP tag to put before the next paragraph
        self.prefix_sep = " "
        self.ie_result: list[bool] = []

    # ---- output ---------------------------------------------------------------------------------
    def flush(self) -> None:
        """End the current paragraph."""
        text = "".join(self.para)
        text = text.strip() if self.fill else text.strip("\n").rstrip()
        if text:
            self.blocks.append(text)
        self.para = []
        self.glue = False

    def add_text(self, raw: str) -> None:
        """Add one text line, joined to the paragraph as fill or no-fill mode says."""
        glue_next = raw.endswith("\\c")
        text = unescape(raw[:-2] if glue_next else raw, self.strings)
        if self.tag_next:
            self.set_prefix(text.strip())
            self.tag_next = False
            return
        if self.prefix:
            self.flush()
            text, self.prefix = f"{self.prefix}{self.prefix_sep}{text.lstrip()}", ""
        if not self.fill:
            self.para.append(("\n" if self.para and not self.glue else "") + text.rstrip())
        elif self.para and not self.glue:
            prev = self.para[-1].rstrip()
            joiner = "" if prev and text and _wide(prev[-1]) and _wide(text.lstrip()[:1] or " ") else " "
            self.para[-1] = prev
            self.para.append(joiner + text.strip())
        else:
            self.para.append(text.strip() if self.fill else text)
        self.glue = glue_next

    def set_prefix(self, tag: str) -> None:
        """Hold a list tag for the next paragraph: bullets and numbers inline, longer tags on their own line."""
        self.flush()
        self.prefix, self.prefix_sep = tag, " " if _LIST_MARK.fullmatch(tag) else "\n"

    def end_block(self) -> None:
        """Flush the paragraph and any tag that got no body."""
        self.flush()
        if self.prefix:
            self.blocks.append(self.prefix)
            self.prefix = ""

    # ---- requests -------------------------------------------------------------------------------
    def heading(self, args: list[str], lines: Iterator[str]) -> None:
        """``.SH``/``.SS``: a heading line (from the arguments or the next line)."""
        self.end_block()
        title = " ".join(args) if args else next(lines, "")
        self.blocks.append(unescape(title, self.strings).strip())

    def conditional(self, name: str, rest: str, lines: Iterator[str]) -> None:
        """``.if``/``.ie``/``.el``: take the nroff branch (``n``) and groff's (``\\n(.g``)."""
        if name == "el":
            taken, body = (not self.ie_result.pop()) if self.ie_result else False, rest
        else:
            cond, _, body = rest.strip().partition(" ")
            taken = cond in ("n", "\\n(.g", "\\n[.g]")
            if name == "ie":
                self.ie_result.append(taken)
        body = body.strip()
        block = [body[3:]] if body.startswith("\\{\\") else None
        if block is not None:
            depth = 1
            for line in lines:
                depth += line.count("\\{") - line.count("\\}")
                if depth <= 0:
                    break
                block.append(line)
            body_lines = [b for b in block if b]
        else:
            body_lines = [body] if body else []
        if taken:
            self.run(iter(body_lines))

    def table(self, lines: Iterator[str]) -> None:
        """``.TS`` ... ``.TE``: one output line per row, cells joined by `` | ``."""
        self.end_block()
        tab, in_format, rows = "\t", True, []
        for line in lines:
            if line.startswith(".TE"):
                break
            if in_format:
                m = re.search(r"tab\s*\((.)\)", line)
                tab = m.group(1) if m else tab
                in_format = not line.rstrip().endswith(".")
                continue
            if line.startswith(".") or line.strip() in ("_", "="):
                continue
            rows.append(" | ".join(unescape(c, self.strings).strip() for c in line.split(tab)))
        if rows:
            self.blocks.append("\n".join(rows))

    def request(self, line: str, lines: Iterator[str]) -> None:
        """Handle one control line."""
        name, _, rest = line[1:].strip().partition(" ")
        if not name or name.startswith(('\\"', "\\}")):
            return
        args = request_args(rest)
        if name in ("SH", "SS"):
            self.heading(args, lines)
        elif name in ("PP", "P", "LP", "sp", "HP", "RS", "RE", "DS", "DE", "in"):
            self.flush()
        elif name == "br":
            if self.para:
                self.para.append("\n")
                self.glue = True
        elif name == "TP":
            self.flush()
            self.tag_next = True
        elif name == "IP":
            self.set_prefix(unescape(args[0], self.strings).strip() if args else "")
        elif name in ("nf", "fi"):
            self.flush()
            self.fill = name == "fi"
        elif name in ("if", "ie", "el"):
            self.conditional(name, rest, lines)
        elif name == "TS":
            self.table(lines)
        elif name == "ds" and args:
            self.strings[args[0]] = unescape(" ".join(args[1:]), self.strings)
        elif name in ("B", "I", "SM", "SB"):
            self.add_text(" ".join(args))
        elif name in ("BR", "RB", "IR", "RI", "BI", "IB"):
            self.add_text("".join(args))
        # everything else (TH, nh, ad, PD, ft, ne, do, ...) only changes layout: ignore it

    def run(self, lines: Iterator[str]) -> None:
        """Render a stream of roff lines."""
        for line in lines:
            if line.startswith((".", "'")):
                self.request(line, lines)
            else:
                self.add_text(line)

    def render(self, source: str) -> str:
        """Render a whole page to plain text, paragraphs separated by blank lines."""
        self.run(iter(source.splitlines()))
        self.end_block()
        return re.sub(r"[ \t]+\n", "\n", "\n\n".join(self.blocks)).strip() + "\n"


def man_to_text(source: str) -> str:
    """Plain text of a man page in roff source."""
    return RoffText().render(source)


def man_name_line(text: str) -> str:
    """The NAME section's line (second block of a rendered page), used as the title."""
    blocks = text.split("\n\n")
    return " ".join(blocks[1].split()) if len(blocks) > 1 else blocks[0]


# --------------------------------------------------------------------------------------------------
# Debian packages: which owns a file, at which version
# --------------------------------------------------------------------------------------------------


def dpkg_versions() -> dict[str, str]:
    """Installed package -> version, from dpkg's status file."""
    versions: dict[str, str] = {}
    for stanza in DPKG_STATUS.read_text(encoding="utf-8").split("\n\n"):
        fields = dict(re.findall(r"^(Package|Version|Status): (.*)$", stanza, flags=re.MULTILINE))
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            versions[fields["Package"]] = fields.get("Version", "")
    return versions


def missing(what: str | Path, packages: Iterable[str]) -> SystemExit:
    """The error for a source file that is not on this machine."""
    return SystemExit(f"{what}: not found; install it with: apt-get install {' '.join(packages)}")


def dpkg_owner(path: Path, candidates: Iterable[str]) -> str:
    """Which of the candidate packages ships ``path`` (by its dpkg file list)."""
    for pkg in candidates:
        for lst in sorted(DPKG_INFO.glob(f"{pkg}.list")) + sorted(DPKG_INFO.glob(f"{pkg}:*.list")):
            if str(path) in lst.read_text(encoding="utf-8").splitlines():
                return pkg
    raise missing(f"{path} as shipped by one of {list(candidates)}", candidates)


# --------------------------------------------------------------------------------------------------
# multilingual sources
# --------------------------------------------------------------------------------------------------


def bcp47(locale: str) -> str:
    """gettext locale name (``pt_BR``, ``sr@latin``) to a BCP 47 tag (``pt-BR``, ``sr-Latn``)."""
    base, _, modifier = locale.partition("@")
    tag = base.replace("_", "-")
    return f"{tag}-Latn" if modifier == "latin" else tag


@dataclass(frozen=True)
class ManSource:
    """Translated man pages of one Debian source package."""

    source: str
    packages: tuple[str, ...]
    license: str
    langs: tuple[str, ...]
    pages: tuple[str, ...]  # "man1/xz.1"

    def docs(self, versions: dict[str, str]) -> Iterator[tuple[Doc, Provenance]]:
        """One document per (language, page) that exists, in that order; every language must have some."""
        for loc in self.langs:
            paths = [(page, MAN_ROOT / loc / f"{page}.gz") for page in self.pages]
            if not any(path.exists() for _, path in paths):
                raise missing(f"{self.source} man pages in {MAN_ROOT / loc}", self.packages)
            for page, path in paths:
                if not path.exists():
                    continue
                text = man_to_text(gzip.decompress(path.read_bytes()).decode("utf-8"))
                doc_id = f"man:{self.source}:{loc}:{Path(page).name}"
                pkg = dpkg_owner(path, self.packages)
                yield (
                    Doc(doc_id, man_name_line(text), text, f"{self.source}-man", bcp47(loc)),
                    Provenance(doc_id, bcp47(loc), path, pkg, versions.get(pkg, "?"), self.license),
                )


def catalogue_messages(path: Path) -> list[str]:
    """Translated messages of a compiled gettext catalogue, in catalogue order, de-duplicated.

    Entries left untranslated (message equal to its msgid) or with no letter outside printf/strftime
    directives (``%s``, ``%H:%M``) are dropped.
    """
    with path.open("rb") as f:
        catalog = gettext.GNUTranslations(f)._catalog  # type: ignore[attr-defined]
    seen: dict[str, None] = {}
    for key, msg in catalog.items():
        msgid = key[0] if isinstance(key, tuple) else key
        text = msg.strip()
        if msgid and text != msgid.strip() and any(c.isalpha() for c in _PRINTF.sub("", text)):
            seen.setdefault(text, None)
    return list(seen)


@dataclass(frozen=True)
class CatalogueSource:
    """gettext message catalogues (``.mo``) of one project, one document per language."""

    source: str
    domain: str
    project: str
    packages: tuple[str, ...]
    license: str
    langs: tuple[str, ...]

    def docs(self, versions: dict[str, str]) -> Iterator[tuple[Doc, Provenance]]:
        """One document per language whose catalogue has enough translated text."""
        for loc in self.langs:
            path = LOCALE_ROOT / loc / "LC_MESSAGES" / f"{self.domain}.mo"
            if not path.exists():
                raise missing(path, self.packages)
            text = "\n\n".join(catalogue_messages(path)) + "\n"
            if len(text) < MIN_CATALOGUE_CHARS:
                continue
            doc_id = f"po:{self.source}:{loc}"
            title = f"{self.project} messages ({bcp47(loc)})"
            pkg = dpkg_owner(path, self.packages)
            yield (
                Doc(doc_id, title, text, f"{self.source}-po", bcp47(loc)),
                Provenance(doc_id, bcp47(loc), path, pkg, versions.get(pkg, "?"), self.license),
            )


PD_XZ = "public domain (XZ Utils; see /usr/share/doc/xz-utils/copyright)"
BSD_SHADOW = "BSD-3-Clause (shadow; see /usr/share/doc/passwd/copyright)"
BSD_PAM = "BSD-3-Clause or GPL, at the user's choice (Linux-PAM; see /usr/share/doc/libpam-runtime/copyright)"
PG_LICENSE = "PostgreSQL License (see /usr/share/doc/postgresql-client-15/copyright)"

# Shadow's pages in these three languages are translated through and through (cs and ja are older
# hand translations); in de/fr/it/pl/ru/sv/zh_CN/da most paragraphs of shadow 4.13's pages are still
# English, so they are left out. chfn.1, chsh.1 and passwd.5 are left out because Debian's copyright
# file marks some of their translations GPL; every page kept is BSD-3-Clause there.
SHADOW_MAN_LANGS = ("cs", "ja", "uk")
SHADOW_MAN_PAGES = (
    "man1/chage.1", "man1/expiry.1", "man1/gpasswd.1", "man1/login.1", "man1/newgrp.1", "man1/passwd.1",
    "man1/sg.1", "man5/faillog.5", "man5/gshadow.5", "man5/login.defs.5", "man5/shadow.5",
    "man8/chgpasswd.8", "man8/chpasswd.8", "man8/faillog.8", "man8/groupadd.8", "man8/groupdel.8",
    "man8/groupmems.8", "man8/groupmod.8", "man8/grpck.8", "man8/lastlog.8", "man8/newusers.8",
    "man8/nologin.8", "man8/pwck.8", "man8/pwconv.8", "man8/useradd.8", "man8/userdel.8",
    "man8/usermod.8", "man8/vipw.8",
)  # fmt: skip

SOURCES: tuple[ManSource | CatalogueSource, ...] = (
    ManSource("xz-utils", ("xz-utils",), PD_XZ, ("de", "fr", "ko", "pt_BR", "ro", "uk"), ("man1/xz.1",)),
    ManSource("shadow", ("passwd", "login"), BSD_SHADOW, SHADOW_MAN_LANGS, SHADOW_MAN_PAGES),
    CatalogueSource(
        "xz-utils", "xz", "XZ Utils", ("xz-utils", "liblzma5"), PD_XZ,
        ("ca", "cs", "da", "de", "eo", "es", "fi", "fr", "hr", "hu", "it", "ko", "pl", "pt", "pt_BR", "ro",
         "sr", "sv", "tr", "uk", "vi", "zh_CN", "zh_TW"),
    ),
    CatalogueSource(
        "shadow", "shadow", "shadow", ("passwd", "login"), BSD_SHADOW,
        ("ca", "dz", "el", "es", "eu", "ka", "kk", "km", "ko", "nb", "ne", "nl", "pt", "ru", "sk", "vi",
         "zh_TW"),
    ),
    CatalogueSource(
        "linux-pam", "Linux-PAM", "Linux-PAM", ("libpam-runtime", "libpam-modules", "libpam0g"), BSD_PAM,
        ("ar", "as", "bn", "gu", "he", "hi", "ka", "km", "kn", "ml", "mr", "or", "pa", "si", "ta", "te",
         "zu"),
    ),
    CatalogueSource(
        "postgresql", "psql-15", "PostgreSQL psql 15", ("postgresql-client-15",), PG_LICENSE,
        ("el", "ja", "ka", "ko", "ru", "zh_CN"),
    ),
)  # fmt: skip


def multilingual_docs() -> tuple[list[Doc], list[Provenance]]:
    """Every multilingual document with its provenance, in source order."""
    versions = dpkg_versions()
    pairs = [pair for src in SOURCES for pair in src.docs(versions)]
    return [d for d, _ in pairs], [p for _, p in pairs]


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------

_LINE_BREAKERS = {"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def json_line(doc: Doc) -> str:
    """One JSONL line; U+0085/U+2028/U+2029 are escaped so that no line splitter breaks a record."""
    line = json.dumps(asdict(doc), ensure_ascii=False)
    for ch, esc in _LINE_BREAKERS.items():
        line = line.replace(ch, esc)
    return line + "\n"


def write_jsonl(docs: list[Doc], path: Path) -> None:
    """Write documents as UTF-8 JSON Lines with ``\\n`` line ends."""
    with path.open("w", encoding="utf-8", newline="\n") as f:
        f.writelines(json_line(d) for d in docs)


def check(named: dict[str, list[Doc]]) -> None:
    """Fail if any id repeats across files or any text is empty."""
    seen: set[str] = set()
    for name, docs in named.items():
        for d in docs:
            if d.id in seen:
                raise SystemExit(f"{name}: duplicate id {d.id!r}")
            if not d.text.strip():
                raise SystemExit(f"{name}: empty text for {d.id!r}")
            seen.add(d.id)


def summary_block(named: dict[str, list[Doc]]) -> str:
    """Markdown table of document counts, sizes and text lengths per file."""
    rows = ["| file | documents | bytes | chars (min / median / max) | docs > 1,000 chars | docs > 32,000 chars |",
            "| --- | ---: | ---: | --- | ---: | ---: |"]  # fmt: skip
    total = 0
    for name, docs in named.items():
        size = (OUT_DIR / name).stat().st_size
        total += size
        lens = sorted(len(d.text) for d in docs)
        rows.append(
            f"| `sample/{name}` | {len(docs)} | {size:,} | {lens[0]:,} / {lens[len(lens) // 2]:,} / {lens[-1]:,}"
            f" | {sum(n > 1000 for n in lens)} | {sum(n > 32000 for n in lens)} |"
        )
    rows.append(f"| total | {sum(map(len, named.values()))} | {total:,} | | | |")
    return "\n".join(rows)


def provenance_block(prov: list[Provenance], docs: list[Doc]) -> str:
    """Markdown table: one row per multilingual document, with its file, package and licence."""
    chars = {d.id: len(d.text) for d in docs}
    rows = ["| id | lang | chars | taken from | Debian package (version) | licence |",
            "| --- | --- | ---: | --- | --- | --- |"]  # fmt: skip
    for p in prov:
        rows.append(
            f"| `{p.doc_id}` | {p.lang} | {chars[p.doc_id]:,} | `{p.path}` | {p.package} ({p.version})"
            f" | {p.license.split(' (')[0]} |"
        )
    return "\n".join(rows)


def replace_block(text: str, name: str, body: str) -> str:
    """Replace the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->``."""
    pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", flags=re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"{README}: no '<!-- BEGIN {name} -->' block to refresh")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def update_readme(named: dict[str, list[Doc]], prov: list[Provenance]) -> None:
    """Refresh the generated blocks of data/README.md."""
    text = README.read_text(encoding="utf-8")
    text = replace_block(text, "summary", summary_block(named))
    text = replace_block(text, "provenance", provenance_block(prov, named[MULTILINGUAL_FILE]))
    README.write_text(text, encoding="utf-8", newline="\n")


def build(out_dir: Path, readme: bool) -> dict[str, list[Doc]]:
    """Generate all three files into ``out_dir`` and (optionally) refresh the README."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ml_docs, prov = multilingual_docs()
    named = {
        PYDOC_FILE: pydoc_docs(),
        CODE_FILE: code_docs(Path(sysconfig.get_paths()["stdlib"])),
        MULTILINGUAL_FILE: ml_docs,
    }
    check(named)
    write_parquet(named[PYDOC_FILE], out_dir / PYDOC_FILE, PYDOC_ROW_GROUP_SIZE)
    write_jsonl(named[CODE_FILE], out_dir / CODE_FILE)
    write_jsonl(named[MULTILINGUAL_FILE], out_dir / MULTILINGUAL_FILE)
    if readme and out_dir == OUT_DIR:
        update_readme(named, prov)
    return named


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: data/sample)")
    parser.add_argument("--no-readme", action="store_true", help="do not refresh data/README.md")
    args = parser.parse_args(argv)
    named = build(args.out.resolve(), readme=not args.no_readme)
    print(f"Python {sys.version.split()[0]}, pyarrow {pa.__version__}")
    for name, docs in named.items():
        size = (args.out / name).stat().st_size
        print(f"{name}: {len(docs)} documents, {size:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
