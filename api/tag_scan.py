"""Finding XML-like tags in text that arrives in pieces: the helpers both streaming parsers share."""

from __future__ import annotations

from collections.abc import Sequence


def partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest proper prefix of `tag` that `text` ends with: text that must be held back because
    the next delta may complete the tag ("<thi" + "nk>")."""
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


def find_first_tag(text: str, tags: Sequence[str], start: int = 0) -> tuple[int, str]:
    """Position and identity of the earliest of `tags` in `text[start:]`; (-1, "") when none occurs."""
    best_pos, best_tag = -1, ""
    for tag in tags:
        pos = text.find(tag, start)
        if pos >= 0 and (best_pos < 0 or pos < best_pos):
            best_pos, best_tag = pos, tag
    return best_pos, best_tag
