"""An LLM's harness edit, applied strictly: SEARCH/REPLACE blocks (the format aider and
OpenEvolve use) or a whole file in one ```python block.

    <<<<<<< SEARCH
    lines copied exactly from the current file
    =======
    the lines to put in their place
    >>>>>>> REPLACE

Blocks apply in order, each to the result of the ones before. A SEARCH that does not occur in
the file, or occurs more than once, is an `EditError` naming the block: nothing is guessed, no
whitespace is forgiven. A reply with no block and no python block is an error too.
"""

from __future__ import annotations

import re

_BLOCK = re.compile(
    r"^<{5,9} ?SEARCH[^\n]*\n(?P<search>.*?)^={5,9}[ \t]*\n(?P<replace>.*?)^>{5,9} ?REPLACE[^\n]*$",
    re.DOTALL | re.MULTILINE,
)
_FENCE = re.compile(r"```(?:python|py)[ \t]*\n(?P<body>.*?)^```", re.DOTALL | re.MULTILINE)
_WHY = re.compile(r"^\s*WHY:\s*(?P<why>.+)$", re.MULTILINE)


class EditError(Exception):
    """The reply cannot be applied to the harness; the message says which part and why."""


def reply_why(reply: str) -> str:
    """The reply's one-line `WHY:` summary, else its first non-empty line (capped)."""
    found = _WHY.search(reply)
    if found:
        return found["why"].strip()[:300]
    first = next((line.strip() for line in reply.splitlines() if line.strip()), "")
    return first[:300]


def apply_reply(source: str, reply: str) -> str:
    """The new harness source the reply asks for."""
    blocks = list(_BLOCK.finditer(reply))
    if blocks:
        out = source
        for i, block in enumerate(blocks, 1):
            search, replace = block["search"], block["replace"]
            if not search.strip():
                raise EditError(f"block {i}: its SEARCH part is empty; copy the lines to replace")
            count = out.count(search)
            if count == 0:
                first = next((ln for ln in search.splitlines() if ln.strip()), "")
                raise EditError(
                    f"block {i}: its SEARCH text does not occur in the harness (first line: "
                    f"{first.strip()[:120]!r}); copy the lines exactly as they are"
                )
            if count > 1:
                raise EditError(
                    f"block {i}: its SEARCH text occurs {count} times; include more lines so "
                    "that it occurs once"
                )
            out = out.replace(search, replace, 1)
        if out == source:
            raise EditError("the blocks change nothing: replace something with something else")
        return out
    if "SEARCH" in reply and "REPLACE" in reply:
        raise EditError(
            "the reply has SEARCH/REPLACE markers but no well-formed block: each block is "
            "'<<<<<<< SEARCH', the old lines, '=======', the new lines, '>>>>>>> REPLACE'"
        )
    fences = [m["body"] for m in _FENCE.finditer(reply)]
    if not fences:
        raise EditError(
            "the reply holds neither SEARCH/REPLACE blocks nor a whole file in a ```python block"
        )
    whole = max(fences, key=len)
    if whole.strip() == source.strip():
        raise EditError("the whole file sent back is the current harness unchanged")
    return whole
