"""Corpora as streams of documents: the built-in stdlib code corpus and user files.

Every machine with Python has the default corpus: the running interpreter's standard-library
sources (code with its docstrings). Order is deterministic (sorted relative paths), identical files
are kept once, and files are split into train / validation by a hash of their path, so a file never
lands in both splits and the split does not depend on what other files exist.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "validation")
TEXT_SUFFIXES = (".txt", ".md", ".py")
# Test suites hold deliberately odd files (bad encodings, huge generated data); idle/turtledemo are demos.
_STDLIB_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "turtledemo"}


@dataclass(frozen=True)
class Document:
    """One training document: plain `text`, or chat `messages` (OpenAI format) for SFT data."""

    source: str  # where it came from, for error messages: "stdlib:json/decoder.py", "data.jsonl:12"
    text: str | None = None
    messages: list | None = field(default=None, hash=False)


def hash_fraction(key: str) -> float:
    """A stable number in [0, 1) for `key` (the same on every machine and Python version)."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(key: str, validation_fraction: float) -> str:
    return "validation" if hash_fraction(key) < validation_fraction else "train"


def _check_split(split: str) -> None:
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be one of {', '.join(SPLITS)} or all, got {split!r}")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's .py files (tests, site-packages and demos excluded), sorted."""
    root = root or stdlib_root()
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _STDLIB_SKIP_DIRS]  # prune: never walk site-packages
        files += [Path(directory, n) for n in names if n.endswith(".py") and not n.startswith("_sysconfigdata")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None  # a handful of stdlib files are latin-1; skipping them keeps the corpus pure UTF-8


def stdlib_documents(split: str = "train", validation_fraction: float = 0.05, limit: int | None = None) -> Iterator[Document]:
    """Standard-library source files as documents, de-duplicated by content."""
    _check_split(split)
    root = stdlib_root()
    seen: set[str] = set()
    produced = 0
    for path in stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        if split != "all" and split_of(rel, validation_fraction) != split:
            continue
        text = _read_text(path)
        if not text or not text.strip():
            continue
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        yield Document(source=f"stdlib:{rel}", text=text)
        produced += 1
        if limit is not None and produced >= limit:
            return


def jsonl_objects(path: str | Path, what: str = "a JSON object") -> Iterator[tuple[str, dict]]:
    """("file:line", object) for every non-blank line of a .jsonl (or .jsonl.gz) file; a line that is
    not JSON, or not an object (`what` says which fields it should have), fails naming file and line."""
    import gzip

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected {what}")
            yield where, record


def _jsonl_documents(path: Path) -> Iterator[tuple[str, Document]]:
    """(split key, document) per line; every error names the file and line."""
    for where, record in jsonl_objects(path, "a JSON object with a 'text' or 'messages' field"):
        if isinstance(record.get("text"), str):
            yield record["text"], Document(source=where, text=record["text"])
        elif isinstance(record.get("messages"), list) and record["messages"]:
            messages = record["messages"]
            if not all(isinstance(m, dict) and "role" in m for m in messages):
                raise ValueError(f"{where}: every message needs a 'role'")
            key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
            yield key, Document(source=where, messages=messages)
        else:
            raise ValueError(f"{where}: expected a string 'text' field or a non-empty 'messages' list")


def user_documents(path: str | Path, split: str = "train", validation_fraction: float = 0.05) -> Iterator[Document]:
    """Documents from a file or a directory of .txt/.md/.py/.jsonl files (sorted, de-duplicated).

    Files are split by relative path; JSON-lines records by content.
    """
    _check_split(split)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus path {path} does not exist")
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix in (*TEXT_SUFFIXES, ".jsonl")),
                       key=lambda p: p.relative_to(path).as_posix())
        base = path
    else:
        if path.suffix not in (*TEXT_SUFFIXES, ".jsonl"):
            raise ValueError(f"{path}: unsupported file type (use .txt, .md, .py or .jsonl)")
        files, base = [path], path.parent
    seen: set[str] = set()
    for file in files:
        if file.suffix == ".jsonl":
            items = _jsonl_documents(file)
        else:
            try:
                text = file.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{file}: not UTF-8 text (byte {exc.start})") from None
            items = iter([(file.relative_to(base).as_posix(), Document(source=str(file), text=text))])
        for key, doc in items:
            body = doc.text if doc.text is not None else key
            digest = hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest()
            if digest in seen or (doc.text is not None and not doc.text.strip()):
                continue
            seen.add(digest)
            if split == "all" or split_of(key, validation_fraction) == split:
                yield doc


def corpus_documents(spec: str, split: str = "train", validation_fraction: float = 0.05) -> Iterator[Document]:
    """`spec` is "stdlib" or a path."""
    if spec == "stdlib":
        return stdlib_documents(split, validation_fraction)
    return user_documents(spec, split, validation_fraction)
