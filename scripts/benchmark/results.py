"""The figures of a run as JSON lines in --results DIR, and the report's place in a file.

DIR/run.json        the command, the date, the modes and their titles
DIR/<workload>.jsonl one line per measurement: {"workload", "number", "mode",
                    "title", "run", "figures": {key: value}}; a failed cell is a
                    line with "failed": text instead of figures; the workloads
                    with their own section (tunnels, rate) one line per figure
                    key with every run's value
DIR/report.md       the markdown report of the run, whole
DIR/*.png           the charts drawn from the JSON lines (charts.py), when matplotlib is there

The report goes into its file between two marker comments: what is outside
them (hand-written prose) is never rewritten.
"""

import contextlib
import json
import os
import time
from typing import Dict, List, Optional, Sequence

BEGIN_MARKER = "<!-- scripts/bench: generated from here; edits up to the end marker are lost -->"
END_MARKER = "<!-- scripts/bench: generated up to here -->"


class ResultsDir:
    """Appends each workload's figures to DIR/<workload>.jsonl as they are measured."""

    def __init__(self, directory: Optional[str]) -> None:
        self.directory = directory
        if directory:
            os.makedirs(directory, exist_ok=True)

    def clear(self, names: Sequence[str]) -> None:
        """Remove the files of these names an earlier run left: its figures would be read
        back (and charted) with this run's. Other files in the directory stay."""
        for name in names if self.directory else ():
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path(name))

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def append(self, workload_name: str, record: Dict) -> None:
        if not self.directory:
            return
        with open(self.path(workload_name + ".jsonl"), "a") as out:
            out.write(json.dumps(record, sort_keys=True) + "\n")

    def measured(self, workload, mode: str, title: str, run: int, figures: Dict) -> None:
        self.append(workload.name, {
            "workload": workload.name, "number": workload.number, "mode": mode,
            "title": title, "run": run + 1,
            "figures": {k: v for k, v in figures.items() if v is not None},
        })

    def failed(self, workload, modes: Sequence[str], text: str) -> None:
        for mode in modes:
            self.append(workload.name, {"workload": workload.name, "number": workload.number,
                                        "mode": mode, "failed": text})

    def sections(self, section_values: Dict[tuple, List[float]]) -> None:
        """The figures of tunnels and rate, keyed by a tuple whose first item is the workload."""
        for key, runs in section_values.items():
            self.append(str(key[0]), {"workload": str(key[0]), "key": list(key[1:]),
                                      "runs": list(runs)})

    def run_description(self, command: str, seconds: float, titles: Dict[str, str],
                        smoke: bool) -> None:
        if not self.directory:
            return
        description = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                       "seconds": round(seconds, 1), "modes": titles, "smoke": smoke}
        with open(self.path("run.json"), "w") as out:
            json.dump(description, out, indent=1, sort_keys=True)
            out.write("\n")

    def report(self, text: str) -> None:
        if self.directory:
            with open(self.path("report.md"), "w") as out:
                out.write(text)


def read_jsonl(path: str) -> List[Dict]:
    with open(path) as source:
        return [json.loads(line) for line in source if line.strip()]


def with_generated_section(existing: Optional[str], generated: str) -> str:
    """existing with its marked section replaced by generated; the section is appended
    when existing has none, and is the whole text when there is no file yet."""
    body = generated if generated.endswith("\n") else generated + "\n"
    block = "%s\n%s%s\n" % (BEGIN_MARKER, body, END_MARKER)
    if not existing:
        return block
    begin = existing.find(BEGIN_MARKER)
    end = existing.find(END_MARKER, begin + 1) if begin >= 0 else -1
    if begin < 0 or end < 0:
        return existing + ("" if existing.endswith("\n") else "\n") + "\n" + block
    after = existing[end + len(END_MARKER):]  # from the end marker's own newline on
    return existing[:begin] + block.rstrip("\n") + after


def write_report(path: str, generated: str) -> None:
    """Put generated into path's marked section, leaving everything around it as it was."""
    existing = None
    if os.path.exists(path):
        with open(path) as source:
            existing = source.read()
    text = with_generated_section(existing, generated)
    with open(path + ".tmp", "w") as out:
        out.write(text)
    os.replace(path + ".tmp", path)
