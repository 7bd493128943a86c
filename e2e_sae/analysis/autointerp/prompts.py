"""The prompts (chat messages) of the explainer and the two scorers, and parsers of their replies.

Activations shown to the explainer are on a 0-10 scale: round(10 * activation / the largest
activation among the examples shown), the scale of Bills et al. 2023; tokens at 1 or more are
marked [[like this]] in the text and listed with their value. The simulator is asked for one
line per token, `<number>\\t<token>\\t<activation 0-10>`; detection asks yes / no.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from e2e_sae.analysis.autointerp.examples import Example

Message = dict[str, str]

SYSTEM = (
    "You are a careful interpretability researcher. You study single features of a language "
    "model: units that are active on some tokens of a text and silent on the others."
)
EXPLANATION_PREFIX = "Explanation:"
# A local model's reply starts with this (a small model then names tokens, not the prompt).
LOCAL_EXPLAIN_PREFILL = 'Explanation: the feature is active on "'
# The simulator's reply: one line per token, the activation last (0-10).
SIM_LINE = "{n}\t{token}\t"


def scale(acts: Sequence[float], peak: float) -> list[int]:
    """Activations on the 0-10 scale relative to `peak`; any positive activation is at least 1
    (so every token the feature is active on is shown as such)."""
    if peak <= 0:
        return [0] * len(acts)
    return [0 if a <= 0 else max(1, min(10, round(10 * a / peak))) for a in acts]


def marked_text(ex: Example, levels: Sequence[int]) -> str:
    """The window's text with the tokens at level >= 1 wrapped in [[ ]]."""
    return "".join(f"[[{t}]]" if lv >= 1 else t for t, lv in zip(ex.tokens, levels, strict=True))


def explainer_messages(examples: Sequence[Example]) -> list[Message]:
    """Ask for a one-phrase explanation from the examples (top first, then quantile ones). Each
    excerpt lists the active tokens first, then its text (a small model copies what comes
    first: the tokens, not the text)."""
    peak = max((max(ex.acts, default=0.0) for ex in examples), default=0.0)
    parts = []
    for i, ex in enumerate(examples, 1):
        levels = scale(ex.acts, peak)
        active = [f'"{t}" ({lv})' for t, lv in zip(ex.tokens, levels, strict=True) if lv >= 1]
        parts.append(
            f"{i}. Tokens: {', '.join(active) or 'none'}\n   Text: {marked_text(ex, levels)}"
        )
    user = (
        "Below are text excerpts where one feature of a language model is active. For each, "
        "the tokens it is active on (with the activation from 1 to 10; 10 is its strongest), "
        "then the text with those tokens marked [[like this]].\n\n"
        + "\n".join(parts)
        + "\n\nWhat does the feature respond to? Answer with a short phrase (at most 15 words) "
        f'on one line starting with "{EXPLANATION_PREFIX}".'
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def parse_explanation(reply: str) -> str:
    """The explanation in a reply: the text after the last "Explanation:" on its line, else the
    first non-empty line; activation levels "(7)", quotes around it all, a trailing period and
    extra space removed (at most 300 chars)."""
    lines = [ln.strip() for ln in reply.strip().splitlines() if ln.strip()]
    text = ""
    for ln in lines:
        low = ln.lower()
        if EXPLANATION_PREFIX.lower() in low:
            text = ln[low.rindex(EXPLANATION_PREFIX.lower()) + len(EXPLANATION_PREFIX) :]
            break
    else:
        text = lines[0] if lines else ""
    text = " ".join(re.sub(r"\s*\(\d+\)", "", text).split())  # activation levels copied over
    text = text.strip().rstrip(".").strip()
    while len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`*":  # surrounding quotes
        text = text[1:-1].strip().rstrip(".").strip()
    return text[:300]


def token_lines(ex: Example) -> str:
    return "\n".join(f"{n}\t{t}" for n, t in enumerate(ex.tokens, 1))


def simulation_messages(explanation: str, ex: Example) -> list[Message]:
    """Ask for each token's activation (0-10) given the explanation."""
    user = (
        f'A feature of a language model is explained as: "{explanation}".\n'
        "Here is a text, one numbered token per line:\n\n"
        f"{token_lines(ex)}\n\n"
        "For every token, predict how strongly the feature is active on it, from 0 (not "
        "active, the usual case) to 10 (as strongly as it ever is). Reply with one line per "
        "token, in order, each of the form: number<TAB>token<TAB>activation. No other text."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


_SIM_ROW = re.compile(r"^\s*(\d+)\b.*?(\d+(?:\.\d+)?)\s*$")


def parse_simulation(reply: str, n_tokens: int) -> tuple[list[float], int]:
    """(predicted activation per token, how many tokens had no parsable line). A line's first
    integer is the token's number and its last number the activation, clipped to [0, 10];
    tokens without a line are predicted 0."""
    pred: list[float | None] = [None] * n_tokens
    for line in reply.splitlines():
        m = _SIM_ROW.match(line)
        if not m or m.start(2) <= m.end(1):
            continue
        n = int(m.group(1))
        if 1 <= n <= n_tokens and pred[n - 1] is None:
            pred[n - 1] = min(10.0, max(0.0, float(m.group(2))))
    missing = sum(p is None for p in pred)
    return [0.0 if p is None else p for p in pred], missing


def context_text(ex: Example) -> str:
    return "".join(ex.tokens)


def detection_messages(explanation: str, ex: Example) -> list[Message]:
    """One context: is the feature active anywhere in it? (answered Yes / No)."""
    user = (
        f'A feature of a language model is explained as: "{explanation}".\n\n'
        f"Text: {context_text(ex)}\n\n"
        "Is the feature active on any token of this text? Answer Yes or No."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def detection_batch_messages(explanation: str, contexts: Sequence[Example]) -> list[Message]:
    """All contexts of a feature in one request (for chat endpoints): one yes/no line each."""
    texts = "\n".join(f"Text {n}: {context_text(ex)}" for n, ex in enumerate(contexts, 1))
    user = (
        f'A feature of a language model is explained as: "{explanation}".\n'
        "Below are numbered texts. In some of them the feature is active on at least one "
        "token; in the others it is not active at all.\n\n"
        f"{texts}\n\n"
        "For each text, say whether the feature is active in it. Reply with one line per text, "
        'of the form "number: yes" or "number: no". No other text.'
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


_DET_ROW = re.compile(r"^\W*(?:text\s*)?(\d+)\W+(yes|no)\b", re.IGNORECASE)


def parse_detection(reply: str, n: int) -> tuple[list[float], int]:
    """(score per context: 1 yes, 0 no, 0.5 where the reply has no line for it; the number of
    such contexts)."""
    scores: list[float | None] = [None] * n
    for line in reply.splitlines():
        m = _DET_ROW.match(line.strip())
        if m and 1 <= int(m.group(1)) <= n and scores[int(m.group(1)) - 1] is None:
            scores[int(m.group(1)) - 1] = 1.0 if m.group(2).lower() == "yes" else 0.0
    missing = sum(s is None for s in scores)
    return [0.5 if s is None else s for s in scores], missing
