"""Build the two real-text tasks of bench/real_convergence.py from text that ships with Debian and Python.

    apt-get update -o Acquire::Languages=en && python bench/real_tasks/make_tasks.py

- `debian.jsonl`: a Debian package's long description -> its one-line synopsis (summarisation), from
  the English package descriptions of Debian 12 "bookworm" main (`Translation-en`, fetched by
  `apt-get update -o Acquire::Languages=en`).
- `pydoc.jsonl`: a paragraph of the Python reference manual -> the help topic it belongs to
  (classification), from `pydoc_data.topics` of the running Python.

Each record gets a fixed split from a hash of its key (package name, or topic + paragraph), so a rerun
gives the same split; the files are committed so that the benchmark does not depend on this machine's lists.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent
SIZES = {"val": 64, "test": 64}  # then up to MAX_TRAIN for training
MAX_TRAIN = 2000


def words(text: str) -> int:
    return len(text.split())


def debian_records() -> list[dict]:
    """Packages whose long description is one paragraph of 15-40 words and whose synopsis has 3-12."""
    lists = sorted(Path("/var/lib/apt/lists").glob("*bookworm_main_i18n_Translation-en*"))
    if not lists:
        sys.exit("no Translation-en list: run `apt-get update -o Acquire::Languages=en` first")
    dump = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", str(lists[0])], capture_output=True, text=True,
                          check=True).stdout
    records, seen = [], set()
    for stanza in dump.split("\n\n"):
        name = re.search(r"^Package: (.+)$", stanza, re.M)
        desc = re.search(r"^Description-en: (.+)\n((?: .*\n?)*)", stanza, re.M)
        if not name or not desc:
            continue
        synopsis, body = desc.group(1).strip(), desc.group(2)
        if " ." in body.splitlines() or re.search(r"^ \.$", body, re.M):
            continue  # several paragraphs
        long = " ".join(line.strip() for line in body.splitlines() if line.strip())
        if not (15 <= words(long) <= 40 and 3 <= words(synopsis) <= 12) or synopsis.lower() in seen:
            continue
        seen.add(synopsis.lower())
        records.append({"key": name.group(1), "prompt": f"Debian package description:\n{long}\nOne-line synopsis:",
                        "completion": f" {synopsis}"})
    return records


def pydoc_records() -> list[dict]:
    """Paragraphs of 20-45 words of each help topic, labelled with the topic."""
    from pydoc_data.topics import topics

    records = []
    for topic, text in sorted(topics.items()):
        for para in text.split("\n\n"):
            para = " ".join(para.split())
            if 20 <= words(para) <= 45:
                records.append({"key": f"{topic}:{para}", "prompt": f"Python reference manual paragraph:\n{para}\n"
                                "Help topic:", "completion": f" {topic}"})
    return records


def split(records: list[dict]) -> list[dict]:
    """Order by a hash of the key; the first 64 are val, the next 64 test, the next MAX_TRAIN train."""
    ordered = sorted(records, key=lambda r: hashlib.sha256(r["key"].encode()).hexdigest())
    out, start = [], 0
    for name, size in SIZES.items():
        out += [{**r, "split": name} for r in ordered[start:start + size]]
        start += size
    return out + [{**r, "split": "train"} for r in ordered[start:start + MAX_TRAIN]]


def main() -> None:
    for name, make in (("debian", debian_records), ("pydoc", pydoc_records)):
        records = split(make())
        path = OUT / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        counts = {s: sum(r["split"] == s for r in records) for s in ("train", "val", "test")}
        print(f"{path}: {counts}", file=sys.stderr)


if __name__ == "__main__":
    main()
