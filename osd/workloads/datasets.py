"""Loaders for the five real domains in ``../shared/data``, with fixed train / eval splits.

Every domain yields :class:`Query` records in one documented text format; the zoo is
trained on ``query.text`` of the *train* split, and every evaluation, benchmark and
replay uses the *eval* split, so no evaluation prompt was seen in zoo training.

Formats (``prompt`` | ``reference``):

============  ==============================================================  =================
domain        prompt                                                          reference
============  ==============================================================  =================
math          ``Question: <gsm8k question>\\nAnswer:``                          `` <worked answer, calculator marks removed, ends '#### N'>``
sql           ``-- Database: <db> (<tables>)\\n-- Question: <question>\\n``      ``<SQL query>;``
code          ``<signature + docstring>`` (HumanEval prompt, stdlib function)  ``<function body>``
prose         ``<first lines of a Shakespeare passage>``                      ``<rest of passage>``
instruct      ``Instruction: <instruction>\\n[Input: <input>\\n]Output:``       `` <output>``
============  ==============================================================  =================

The split of a query is a pure function of its stable id and a seed (a salted SHA-256),
so it never changes when a data file grows or the loading order changes.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

DOMAINS: tuple[str, ...] = ("math", "sql", "code", "prose", "instruct")
DATA_ENV = "OSD_DATA_DIR"
SPLIT_SEED = 20261122
EVAL_FRACTION = 0.1
Split = Literal["train", "eval", "all"]


@dataclass(frozen=True)
class Query:
    """One request of a workload. ``id`` is stable across runs and machines."""

    id: str
    domain: str
    prompt: str
    reference: str | None = None

    @property
    def text(self) -> str:
        """The training text: prompt followed by the reference answer."""
        return self.prompt + (self.reference or "")


def data_root(path: str | os.PathLike | None = None) -> Path:
    """Where the shared data sets live: ``path`` > ``$OSD_DATA_DIR`` > ``../shared/data``.

    ``../shared/data`` is looked up from the working directory and from the project
    checkout. Raises ``FileNotFoundError`` naming every place tried.
    """
    if path is not None:
        candidates = [Path(path)]
    elif os.environ.get(DATA_ENV):
        candidates = [Path(os.environ[DATA_ENV])]
    else:
        repo = Path(__file__).resolve().parents[2]
        candidates = [Path.cwd() / ".." / "shared" / "data", repo / ".." / "shared" / "data"]
    for c in candidates:
        if (c / "gsm8k").is_dir():
            return c.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"data sets not found (tried {tried}); pass --data-dir or set ${DATA_ENV} to the "
        "folder that holds gsm8k/, spider/, humaneval/, tinyshakespeare/, instructions/"
    )


def split_of(query_id: str, seed: int = SPLIT_SEED, eval_fraction: float = EVAL_FRACTION) -> str:
    """``"eval"`` or ``"train"``: a salted hash of the id, fixed for a given seed."""
    h = hashlib.sha256(f"{seed}:{query_id}".encode()).digest()
    return "eval" if int.from_bytes(h[:8], "big") / 2**64 < eval_fraction else "train"


def _read_jsonl(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


_CALC = re.compile(r"<<[^>]*>>")


def _math(root: Path) -> Iterator[Query]:
    for i, row in enumerate(_read_jsonl(root / "gsm8k" / "train.jsonl")):
        answer = _CALC.sub("", row["answer"])
        yield Query(f"math/{i}", "math", f"Question: {row['question']}\nAnswer:", f" {answer}")


def _sql(root: Path) -> Iterator[Query]:
    tables = json.loads((root / "spider" / "tables.json").read_text(encoding="utf-8"))
    names = {t["db_id"]: ", ".join(t["table_names_original"]) for t in tables}
    rows = json.loads((root / "spider" / "dev.json").read_text(encoding="utf-8"))
    for i, row in enumerate(rows):
        db = row["db_id"]
        prompt = f"-- Database: {db} ({names.get(db, '')})\n-- Question: {row['question']}\n"
        yield Query(f"sql/{i}", "sql", prompt, row["query"].strip() + ";")


# Standard-library folders whose functions make the `code` domain (stable, plain Python).
_STDLIB_MODULES = (
    "json",
    "email",
    "http",
    "logging",
    "asyncio",
    "concurrent",
    "importlib",
    "xml",
    "unittest",
    "urllib",
    "collections",
    "argparse.py",
    "textwrap.py",
    "shutil.py",
    "pathlib.py",
    "tarfile.py",
    "zipfile",
    "ftplib.py",
    "csv.py",
    "difflib.py",
    "statistics.py",
    "fractions.py",
    "calendar.py",
    "configparser.py",
    "inspect.py",
    "pprint.py",
    "random.py",
    "string.py",
    "tokenize.py",
    "dataclasses.py",
    "heapq.py",
    "bisect.py",
    "functools.py",
    "ipaddress.py",
    "gettext.py",
    "locale.py",
    "mailbox.py",
    "smtplib.py",
    "subprocess.py",
    "tempfile.py",
    "threading.py",
    "traceback.py",
)


def _stdlib_files() -> list[Path]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for name in _STDLIB_MODULES:
        p = lib / name
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*.py") if "test" not in f.parts))
        elif p.is_file():
            files.append(p)
    return files


def _functions(path: Path) -> Iterator[tuple[str, str, str]]:
    """(qualname, head, body) for each plain function of 4–40 lines with a docstring."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError):
        return
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef) or not node.body:
            continue
        doc = ast.get_docstring(node, clean=False)
        n = (node.end_lineno or node.lineno) - node.lineno + 1
        if doc is None or not 4 <= n <= 40 or len(node.body) < 2:
            continue
        start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
        split = node.body[1].lineno - 1  # first statement after the docstring
        indent = len(lines[start]) - len(lines[start].lstrip())
        dedent = lambda s, k=indent: "".join(ln[k:] if ln[:k].isspace() else ln for ln in s)  # noqa: E731
        head = dedent(lines[start:split])
        body = dedent(lines[split : node.end_lineno])
        yield f"{node.name}:{node.lineno}", head, body


def _code(root: Path) -> Iterator[Query]:
    for row in _read_jsonl(root / "humaneval" / "HumanEval.jsonl.gz"):
        yield Query(f"code/{row['task_id']}", "code", row["prompt"], row["canonical_solution"])
    lib = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files():
        rel = path.relative_to(lib).as_posix()
        for qual, head, body in _functions(path):
            yield Query(f"code/stdlib/{rel}:{qual}", "code", head, body)


def _prose(root: Path) -> Iterator[Query]:
    """Shakespeare passages: consecutive speeches merged to ≥ 300 characters."""
    text = (root / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    blocks = [b.strip("\n") for b in text.split("\n\n") if b.strip()]
    passage: list[str] = []
    i = 0
    for block in blocks:
        passage.append(block)
        joined = "\n\n".join(passage)
        if len(joined) < 300:
            continue
        lines = joined.splitlines(keepends=True)
        cut = max(2, len(lines) // 3)
        yield Query(f"prose/{i}", "prose", "".join(lines[:cut]), "".join(lines[cut:]) + "\n")
        passage, i = [], i + 1


def _instruct(root: Path) -> Iterator[Query]:
    for name in ("seed_tasks.jsonl", "user_oriented_instructions.jsonl"):
        for row in _read_jsonl(root / "instructions" / name):
            for j, inst in enumerate(row["instances"]):
                prompt = f"Instruction: {row['instruction'].strip()}\n"
                if inst.get("input", "").strip():
                    prompt += f"Input: {inst['input'].strip()}\n"
                yield Query(
                    f"instruct/{row['id']}/{j}",
                    "instruct",
                    prompt + "Output:",
                    " " + inst["output"].strip() + "\n",
                )


_LOADERS = {"math": _math, "sql": _sql, "code": _code, "prose": _prose, "instruct": _instruct}


@lru_cache(maxsize=32)
def _load_all(domain: str, root: Path) -> tuple[Query, ...]:
    """Every query of a domain, exact-duplicate prompts dropped (first kept), so that one
    prompt can never sit in both splits (the stdlib repeats some signatures + docstrings)."""
    seen: set[str] = set()
    out = []
    for q in _LOADERS[domain](root):
        if q.prompt not in seen:
            seen.add(q.prompt)
            out.append(q)
    return tuple(out)


def load_domain(
    domain: str, split: Split = "eval", data_dir: str | os.PathLike | None = None
) -> list[Query]:
    """All queries of one domain in a split (``train``, ``eval`` or ``all``), in file order."""
    if domain not in _LOADERS:
        raise ValueError(f"unknown domain {domain!r}; choose from {', '.join(DOMAINS)}")
    if split not in ("train", "eval", "all"):
        raise ValueError(f"unknown split {split!r}; choose train, eval or all")
    queries = _load_all(domain, data_root(data_dir))
    if split == "all":
        return list(queries)
    return [q for q in queries if split_of(q.id) == split]


def parse_domains(spec: str | None) -> list[str]:
    """``"math,sql"`` → ``["math", "sql"]``; ``None`` or ``"all"`` → every domain."""
    if spec is None or spec == "all":
        return list(DOMAINS)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in DOMAINS]
    if bad or not names:
        raise ValueError(f"unknown domain(s) {bad or spec!r}; choose from {', '.join(DOMAINS)}")
    return names
