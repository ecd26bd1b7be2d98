#!/usr/bin/env python
"""Build the bench corpus and the sample trace under ``kvbaton/bench/data/``.

Every source installs offline: the Python standard library (reference text from
``pydoc_data/topics.py``, the PSF licence text, selected ``.py`` modules) and the licence
texts Debian's ``base-files`` package ships in ``/usr/share/common-licenses``. Nothing is
fetched from the web. The output is byte-for-byte reproducible from the same sources:
documents are sorted, JSON keys are sorted and gzip gets a zero mtime and no file name.

The committed corpus was built with CPython 3.11.7; a different Python ships slightly different
docs and sources, so rebuilding elsewhere gives a different (still valid) corpus. ``--check``
rebuilds in memory and says whether the result matches the committed manifest.

    .venv/bin/python scripts/build_corpus.py            # write kvbaton/bench/data/
    .venv/bin/python scripts/build_corpus.py --check    # compare with what is committed
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import math
import platform
import random
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "kvbaton" / "bench" / "data"
CORPUS_FILE = "corpus.jsonl.gz"
MANIFEST_FILE = "manifest.json"
TRACE_FILE = "sample_trace.jsonl"
FORMAT_VERSION = 1

PSF = "PSF-2.0 (Python Software Foundation License)"
VERBATIM = "verbatim copying permitted by the licence text itself"

# Standard-library modules taken as code documents: common, readable, about 1 MB together.
CODE_MODULES = [
    "abc.py", "asyncio/locks.py", "asyncio/queues.py", "bisect.py", "calendar.py",
    "collections/__init__.py", "configparser.py", "contextlib.py", "copy.py", "csv.py",
    "dataclasses.py", "difflib.py", "enum.py", "fnmatch.py", "fractions.py", "functools.py",
    "glob.py", "gzip.py", "heapq.py", "ipaddress.py", "json/__init__.py", "json/decoder.py",
    "json/encoder.py", "pprint.py", "queue.py", "random.py", "sched.py", "selectors.py",
    "shlex.py", "shutil.py", "statistics.py", "string.py", "textwrap.py", "tokenize.py",
    "urllib/parse.py", "weakref.py",
]
# Licence texts from Debian's base-files; each permits verbatim copies of itself.
LICENCE_TEXTS = ["Apache-2.0", "Artistic", "GFDL-1.3", "GPL-3", "LGPL-2.1", "MPL-2.0"]
COMMON_LICENSES = Path("/usr/share/common-licenses")


def _doc(doc_id: str, kind: str, source: str, licence: str, text: str) -> dict[str, str]:
    return {"id": doc_id, "kind": kind, "source": source, "licence": licence, "text": text}


def collect_documents() -> list[dict[str, str]]:
    """Every corpus document, sorted by id; raises if a source is missing."""
    import pydoc_data.topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [
        _doc(f"python-reference/{name}", "prose", "pydoc_data/topics.py", PSF, text)
        for name, text in pydoc_data.topics.topics.items()
    ]
    docs.append(_doc("python/LICENSE.txt", "prose", "Lib/LICENSE.txt", PSF,
                     (stdlib / "LICENSE.txt").read_text(encoding="utf-8")))
    if not COMMON_LICENSES.is_dir():
        raise SystemExit(f"{COMMON_LICENSES} is missing: install Debian's base-files package")
    for name in LICENCE_TEXTS:
        text = (COMMON_LICENSES / name).read_text(encoding="utf-8")
        docs.append(_doc(f"common-licenses/{name}", "prose", f"{COMMON_LICENSES}/{name}",
                         VERBATIM, text))
    for rel in CODE_MODULES:
        text = (stdlib / rel).read_text(encoding="utf-8")
        docs.append(_doc(f"python-stdlib/{rel}", "code", f"Lib/{rel}", PSF, text))
    return sorted(docs, key=lambda d: d["id"])


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_corpus(docs: list[dict[str, str]]) -> bytes:
    """The gzip'd JSONL bytes: deterministic for the same documents."""
    lines = "".join(json.dumps(d, sort_keys=True, ensure_ascii=False) + "\n" for d in docs)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(lines.encode("utf-8"))
    return buf.getvalue()


def build_manifest(docs: list[dict[str, str]], blob: bytes) -> dict:
    totals: dict[str, dict[str, int]] = {}
    for d in docs:
        t = totals.setdefault(d["kind"], {"documents": 0, "bytes": 0})
        t["documents"] += 1
        t["bytes"] += len(d["text"].encode("utf-8"))
    return {
        "format": FORMAT_VERSION,
        "file": CORPUS_FILE,
        "file_bytes": len(blob),
        "file_sha256": _sha256(blob),
        "built_with": {"python": platform.python_version(), "builder": "scripts/build_corpus.py"},
        "totals": dict(sorted(totals.items())),
        "documents": [
            {
                "id": d["id"], "kind": d["kind"], "source": d["source"], "licence": d["licence"],
                "bytes": len(d["text"].encode("utf-8")),
                "sha256": _sha256(d["text"].encode("utf-8")),
            }
            for d in docs
        ],
    }


def synthetic_trace(seed: int = 0, n: int = 48, block: int = 512) -> list[dict]:
    """A small trace in Mooncake's published format (synthetic, not Mooncake's data).

    Four "system prompts" of 1-3 blocks are shared across requests, a third of the requests
    continue an earlier request (its hash ids plus new blocks, like a conversation turn), and
    arrivals are Poisson with a 0.5 s mean gap. Inputs stay within 8 blocks so a CPU server
    can replay it.
    """
    rng = random.Random(seed)
    next_id = 0

    def fresh(k: int) -> list[int]:
        nonlocal next_id
        ids = list(range(next_id, next_id + k))
        next_id += k
        return ids

    systems = [fresh(rng.randint(1, 3)) for _ in range(4)]
    out: list[dict] = []
    t_ms = 0.0
    for _ in range(n):
        t_ms += rng.expovariate(1 / 500.0)
        if out and rng.random() < 1 / 3:
            base = rng.choice(out)["hash_ids"]
        else:
            base = rng.choices(systems, weights=[8, 4, 2, 1])[0]
        new_blocks = rng.randint(1, 3)
        ids = (base + fresh(new_blocks))[:8]
        if len(ids) == len(base):  # already at the cap: the last block becomes its own
            ids = ids[:-1] + fresh(1)
        length = len(ids) * block - rng.randrange(block)
        out.append({"timestamp": int(t_ms), "input_length": length,
                    "output_length": rng.randint(16, 256), "hash_ids": ids})
    return out


def encode_trace(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="rebuild in memory and compare with the committed files")
    ap.add_argument("--out", type=Path, default=DATA, help="output directory")
    args = ap.parse_args(argv)

    docs = collect_documents()
    blob = encode_corpus(docs)
    manifest_bytes = (json.dumps(build_manifest(docs, blob), indent=1) + "\n").encode("utf-8")
    trace = encode_trace(synthetic_trace())
    files = {CORPUS_FILE: blob, MANIFEST_FILE: manifest_bytes, TRACE_FILE: trace}
    if args.check:
        bad = [n for n, b in files.items()
               if not (args.out / n).is_file() or (args.out / n).read_bytes() != b]
        if bad:
            built = json.loads((args.out / MANIFEST_FILE).read_text()).get("built_with", {}) \
                if (args.out / MANIFEST_FILE).is_file() else {}
            print(f"differs: {', '.join(bad)} (committed built with {built}, "
                  f"this is Python {platform.python_version()})", file=sys.stderr)
            return 1
        print("corpus, manifest and sample trace match the committed files")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, b in files.items():
        (args.out / name).write_bytes(b)
    kib = {n: math.ceil(len(b) / 1024) for n, b in files.items()}
    print(f"wrote {len(docs)} documents to {args.out}: {kib} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
