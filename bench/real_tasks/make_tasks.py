"""Build the real-text tasks of bench/real_convergence.py from text that ships with Debian and Python.

    apt-get update -o Acquire::Languages=en && python bench/real_tasks/make_tasks.py
    python bench/real_tasks/make_tasks.py manpages      # only the named tasks

- `debian.jsonl`: a Debian package's long description -> its one-line synopsis (summarisation), from
  the English package descriptions of Debian 12 "bookworm" main (`Translation-en`, fetched by
  `apt-get update -o Acquire::Languages=en`).
- `pydoc.jsonl`: a paragraph of the Python reference manual -> the help topic it belongs to
  (classification), from `pydoc_data.topics` of the running Python.
- `manpages.jsonl`: the first paragraph of a manual page's DESCRIPTION -> the one-line summary of its NAME
  line (summarisation), from the English pages installed in /usr/share/man (man(7) source, read here without
  groff). The Google Cloud CLI's 16.6k generated `gcloud` pages are left out: they would be most of the task.

Each record gets a fixed split from a hash of its key (package name, or topic + paragraph), so a rerun
gives the same split; the files are committed so that the benchmark does not depend on this machine's lists.
"""

from __future__ import annotations

import gzip
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


# man(7): the requests that end a paragraph, the font requests whose arguments are running text (alternating
# fonts join their arguments without spaces), and the glyph escapes worth keeping.
MAN_BREAKS = {".PP", ".P", ".LP", ".TP", ".IP", ".HP", ".sp", ".SH", ".SS", ".br", ".RS", ".RE", ".nf", ".fi",
              ".Vb", ".Ve", ".in", ".ti", ".TH"}
MAN_FONTS = {".B": " ", ".I": " ", ".SM": " ", ".SB": " ", ".BR": "", ".RB": "", ".IR": "", ".RI": "", ".BI": "",
             ".IB": ""}
MAN_GLYPHS = {"\\-": "-", "\\(aq": "'", "\\(lq": '"', "\\(rq": '"', "\\(oq": "'", "\\(cq": "'", "\\(em": "--",
              "\\(en": "-", '\\*(L"': '"', '\\*(R"': '"', "\\*(Aq": "'", "\\*(C`": '"', "\\*(C'": '"',
              "\\*(--": "--", "\\ ": " ", "\\~": " "}


def roff_text(line: str) -> str:
    """One line of man(7) source as plain text: glyphs replaced, font, size and zero-width escapes dropped."""
    for escape, glyph in MAN_GLYPHS.items():
        line = line.replace(escape, glyph)
    return re.sub(r"\\f(\(..|\[[^]]*\]|.)|\\s[+-]?\d|\\[&|^%:c]", "", line).replace("\\e", "\\")


def man_sections(source: str) -> dict[str, list[str]]:
    """Each section's paragraphs as plain text, by the section's name in upper case. A paragraph holding a
    request this reader does not render, or an escape it does not know, is dropped."""
    sections: dict[str, list[str]] = {}
    name, para = None, []

    def flush() -> None:
        text = " ".join(" ".join(para).split())
        if name is not None and text and "\0" not in text and "\\" not in text:
            sections.setdefault(name, []).append(text)
        para.clear()

    for line in source.splitlines():
        request = line.split(maxsplit=1)[0] if line.startswith((".", "'")) else None
        if request is None:
            para.append(roff_text(line))
        elif request in MAN_BREAKS:
            flush()
            if request == ".SH":
                name = line[3:].strip().strip('"').upper()
        elif request in MAN_FONTS:
            args = [a or b for a, b in re.findall(r'"((?:[^"]|"")*)"|(\S+)', line[len(request):])]
            para.append(roff_text(MAN_FONTS[request].join(a.replace('""', '"') for a in args)))
        elif not request.startswith((".\\\"", "'\\\"", ".IX", ".ad", ".nh", ".hy", ".ne", ".PD")):
            para.append("\0")
    flush()
    return sections


def manpage_records() -> list[dict]:
    """Pages whose DESCRIPTION starts with a paragraph of 15-45 words and whose NAME summary has 3-12."""
    records, seen = [], set()
    for path in sorted(Path("/usr/share/man").glob("man[1-8]/*.gz")):
        if path.is_symlink() or path.name.startswith("gcloud"):
            continue
        try:
            source = gzip.decompress(path.read_bytes()).decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        sections = man_sections(source)
        name, description = sections.get("NAME", [""])[0], sections.get("DESCRIPTION", [""])[0]
        if " - " not in name:
            continue
        summary = name.split(" - ", 1)[1].strip()
        if not (15 <= words(description) <= 45 and 3 <= words(summary) <= 12) or summary.lower() in seen:
            continue
        seen.add(summary.lower())
        records.append({"key": f"{path.parent.name}/{path.name[:-3]}", "prompt": "Manual page description:\n"
                        f"{description}\nOne-line summary:", "completion": f" {summary}"})
    return records


def split(records: list[dict]) -> list[dict]:
    """Order by a hash of the key; the first 64 are val, the next 64 test, the next MAX_TRAIN train."""
    ordered = sorted(records, key=lambda r: hashlib.sha256(r["key"].encode()).hexdigest())
    out, start = [], 0
    for name, size in SIZES.items():
        out += [{**r, "split": name} for r in ordered[start:start + size]]
        start += size
    return out + [{**r, "split": "train"} for r in ordered[start:start + MAX_TRAIN]]


TASKS = {"debian": debian_records, "pydoc": pydoc_records, "manpages": manpage_records}


def main() -> None:
    for name in sys.argv[1:] or TASKS:
        if name not in TASKS:
            sys.exit(f"unknown task {name!r}: choose from {', '.join(TASKS)}")
        records = split(TASKS[name]())
        path = OUT / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        counts = {s: sum(r["split"] == s for r in records) for s in ("train", "val", "test")}
        print(f"{path}: {counts}", file=sys.stderr)


if __name__ == "__main__":
    main()
