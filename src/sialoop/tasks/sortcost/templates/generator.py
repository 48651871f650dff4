"""Generation-0 harness for the sort-cost task: it returns a sort program from a small library,
chosen by its knobs (ALGORITHM, and EARLY_EXIT for bubble sort). Generation 0 is bubble sort
without an early exit, the most comparisons of all, so the knob search has real gains to find.

When a policy endpoint is there, `solve` asks it for a few words to put in the program's first
comment line (4 tokens), so every episode records one LLM call; the comment never changes
what the program does. KNOBS declares the constants the Meta-Agent turns; no SIGNALS."""

ALGORITHM = "bubble"
EARLY_EXIT = False
COMMENT_TOKENS = 4
KNOBS = {
    "ALGORITHM": {
        "family": "algorithm",
        "choices": ["bubble", "insertion", "selection", "merge", "binary_insertion"],
    },
    "EARLY_EXIT": {"family": "tuning", "choices": [False, True]},
}
SIGNALS = {}
ANSWER = "program"

BUBBLE = """
def sort(items, less):
    items = list(items)
    for end in range(len(items) - 1, 0, -1):
        swapped = False
        for i in range(end):
            if less(items[i + 1], items[i]):
                items[i], items[i + 1] = items[i + 1], items[i]
                swapped = True
        if EARLY_EXIT and not swapped:
            break
    return items
"""

INSERTION = """
def sort(items, less):
    out = []
    for item in items:
        i = len(out)
        while i > 0 and less(item, out[i - 1]):
            i -= 1
        out.insert(i, item)
    return out
"""

SELECTION = """
def sort(items, less):
    items = list(items)
    for start in range(len(items) - 1):
        best = start
        for i in range(start + 1, len(items)):
            if less(items[i], items[best]):
                best = i
        items[start], items[best] = items[best], items[start]
    return items
"""

MERGE = """
def sort(items, less):
    items = list(items)
    if len(items) <= 1:
        return items
    mid = len(items) // 2
    left, right = sort(items[:mid], less), sort(items[mid:], less)
    out, i, j = [], 0, 0
    while i < len(left) and j < len(right):
        if less(right[j], left[i]):
            out.append(right[j])
            j += 1
        else:
            out.append(left[i])
            i += 1
    return out + left[i:] + right[j:]
"""

BINARY_INSERTION = """
def sort(items, less):
    out = []
    for item in items:
        low, high = 0, len(out)
        while low < high:
            mid = (low + high) // 2
            if less(item, out[mid]):
                high = mid
            else:
                low = mid + 1
        out.insert(low, item)
    return out
"""

LIBRARY = {
    "bubble": BUBBLE,
    "insertion": INSERTION,
    "selection": SELECTION,
    "merge": MERGE,
    "binary_insertion": BINARY_INSERTION,
}


def comment(llm, instance):
    """A one-line comment from the policy ('' without an endpoint), printable characters only."""
    if llm is None:
        return ""
    response = llm.completions.create(
        model="policy",
        prompt=f"# A {ALGORITHM} sort for {instance['n']} items:",
        max_tokens=COMMENT_TOKENS,
        temperature=0.0,
    )
    return "".join(c for c in response.choices[0].text if c.isprintable()).strip()


def program(note=""):
    head = f"# {ALGORITHM} sort{': ' + note if note else ''}\nEARLY_EXIT = {EARLY_EXIT!r}\n"
    return head + LIBRARY[ALGORITHM]


def solve(instance, llm):
    return {"program": program(comment(llm, instance))}
