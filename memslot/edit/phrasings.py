"""Phrasings: teach a fact through every way the model was taught to ask it.

A fact taught through one prompt is learned for the slots that prompt reads. Another phrasing
of the same question ("Where was X born?" for "X was born in") reads partly other slots, and
through a differently gated mix of them, so it gives the new answer only as far as the two
overlap. A model folder may carry ``phrasings.json``: groups of templates that ask the same
relation, with ``{s}`` where the subject goes. The editor matches a fact's prompt against the
templates and teaches the fact through every phrasing of its group, and it rehearses earlier
edits the same way, so that a later edit keeps their other phrasings answering too.

Only the phrasings the model was trained on belong in the file (``train-demo`` writes the demo
corpus's training templates): questions asked in words none of them use are what edits must
generalise to, and what ``bench/edits.py`` measures.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from memslot.edit.write import EditError

PHRASINGS = "phrasings.json"
SUBJECT = "{s}"


class Phrasings:
    """Groups of templates that ask one relation; ``expand`` gives a prompt's other phrasings."""

    def __init__(self, groups: list[list[str]]):
        self.groups: list[list[str]] = []
        self._expanded: dict[str, list[str]] = {}  # prompt -> expand(prompt), remembered
        self._patterns: list[tuple[re.Pattern, int]] = []
        for g, group in enumerate(groups):
            if not isinstance(group, list) or len(group) < 2:
                raise EditError(f"phrasing group {g + 1} must list at least two templates")
            for template in group:
                if not isinstance(template, str) or template.count(SUBJECT) != 1:
                    raise EditError(
                        f"phrasing group {g + 1}: {template!r} must contain {SUBJECT} exactly once"
                    )
                head, tail = (re.escape(part) for part in template.split(SUBJECT))
                self._patterns.append((re.compile(f"{head}(.+?){tail}"), g))
            self.groups.append([t.strip() for t in group])

    def expand(self, prompt: str) -> list[str]:
        """``prompt`` followed by the other phrasings of its template's group, for the same
        subject; only ``prompt`` when it matches no template. Where several templates match,
        the one that leaves the shortest subject (the most specific) wins."""
        prompt = prompt.strip()
        if prompt not in self._expanded:
            self._expanded[prompt] = self._expand(prompt)
        return list(self._expanded[prompt])

    def _expand(self, prompt: str) -> list[str]:
        best: tuple[int, str] | None = None
        for pattern, g in self._patterns:
            match = pattern.fullmatch(prompt)
            if match and match.group(1).strip():
                subject = match.group(1).strip()
                if best is None or len(subject) < len(best[1]):
                    best = (g, subject)
        if best is None:
            return [prompt]
        g, subject = best
        others = [t.replace(SUBJECT, subject) for t in self.groups[g]]
        return [prompt] + [p for i, p in enumerate(others) if p != prompt and p not in others[:i]]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"groups": self.groups}, indent=1) + "\n")


def load_phrasings(model_dir: str | Path) -> Phrasings | None:
    """The model folder's phrasings, or None for a folder without them."""
    path = Path(model_dir) / PHRASINGS
    if not path.exists():
        return None
    try:
        return Phrasings(json.loads(path.read_text())["groups"])
    except (ValueError, KeyError, TypeError, EditError) as err:
        raise EditError(f"{path} is not a phrasings file ({err}); rebuild the model") from err
