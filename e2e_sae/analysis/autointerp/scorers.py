"""Explain a feature, then score the explanation by simulation and by detection.

Two routes, chosen by the backend:

- a chat endpoint (`HttpChat`) answers in text, which is parsed (`prompts.parse_*`): the simulator
  writes `number<TAB>token<TAB>activation` lines (integers 0-10), detection one yes/no line per
  context (all of a feature's contexts in one request);
- a local model (`LocalChat`) is read through its next-token probabilities, no text parsed. For
  simulation the reply is teacher-forced as `number<TAB>token<TAB>unknown` lines ("all at once",
  Bills et al. 2023): at each slot the distribution over the labels 0..10 is read and the
  prediction is its expected value. A label of two tokens (SmolLM2 writes 10 as "1" "0") gets
  P("1") * P("0" | "1"), the second factor from a branch token placed at the slot in the same
  forward pass; label 1 keeps the rest of P("1"). Detection reads P(Yes) / (P(Yes) + P(No)) as
  the model's first reply token, one context per prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from e2e_sae.analysis.autointerp import prompts
from e2e_sae.analysis.autointerp.backends import ChatBackend, LocalChat
from e2e_sae.analysis.autointerp.examples import Example
from e2e_sae.analysis.autointerp.metrics import detection_accuracy, roc_auc, simulation_score
from e2e_sae.errors import UserError

LABELS = tuple(range(11))
PLACEHOLDER = "unknown"


def _record(messages: Sequence[dict[str, str]], raw: Any, text: str | None = None) -> dict:
    out: dict[str, Any] = {"messages": list(messages), "raw": raw}
    if text is not None:
        out["reply"] = text
    return out


def explain(backend: ChatBackend, examples: Sequence[Example]) -> tuple[str, dict]:
    """(explanation, record of the prompt and the raw reply)."""
    messages = prompts.explainer_messages(examples)
    if isinstance(backend, LocalChat):
        reply = backend.chat(messages, max_tokens=40, prefill=prompts.LOCAL_EXPLAIN_PREFILL)
    else:
        reply = backend.chat(messages, max_tokens=100)
    return prompts.parse_explanation(reply.text), _record(messages, reply.raw, reply.text)


@dataclass
class Simulation:
    """Per example the predicted activations (0-10 scale), and the records of each request."""

    predicted: list[list[float]]
    records: list[dict]
    unparsed_tokens: int = 0


def simulate(backend: ChatBackend, explanation: str, examples: Sequence[Example]) -> Simulation:
    sim = Simulation([], [])
    for ex in examples:
        messages = prompts.simulation_messages(explanation, ex)
        if isinstance(backend, LocalChat):
            pred, dist = simulate_probs(backend, messages, ex)
            rec = _record(messages, {"label_probs": dist})
        else:
            reply = backend.chat(messages, max_tokens=12 * len(ex.tokens) + 32)
            pred, missing = prompts.parse_simulation(reply.text, len(ex.tokens))
            sim.unparsed_tokens += missing
            rec = _record(messages, reply.raw, reply.text)
        sim.predicted.append(pred)
        sim.records.append(rec)
    return sim


def label_tokens(local: LocalChat) -> list[list[int]]:
    """The token ids of each label "0".."10" (one or two tokens each)."""
    toks = [local.encode(str(v)) for v in LABELS]
    if any(not 1 <= len(t) <= 2 for t in toks):
        raise UserError(f"--model {local.name}: its tokenizer writes a number 0-10 as >2 tokens")
    return toks


def simulate_probs(
    local: LocalChat, messages: Sequence[dict[str, str]], ex: Example
) -> tuple[list[float], list[list[float]]]:
    """(expected activation per token, the label distribution per token) from one forward pass
    over the teacher-forced reply (module docstring)."""
    ids = local.prompt_ids(messages)
    labels = label_tokens(local)
    firsts = sorted({t[0] for t in labels if len(t) == 2})
    slots: list[int] = []
    for n, tok in enumerate(ex.tokens, 1):
        ids += local.encode(prompts.SIM_LINE.format(n=n, token=tok))
        slots.append(len(ids))
        ids += local.encode(PLACEHOLDER + "\n")
    at = [s - 1 for s in slots]
    branches = [(s, f) for s in slots for f in firsts]
    probs, branch_probs = local.next_token_probs(ids, at, branches)
    preds: list[float] = []
    dists: list[list[float]] = []
    for i in range(len(slots)):
        p = probs[i]
        second = {f: branch_probs[i * len(firsts) + j] for j, f in enumerate(firsts)}
        mass = torch.zeros(len(LABELS), dtype=torch.float64)
        for v, t in enumerate(labels):
            p_first = float(p[t[0]])
            if len(t) == 2:
                mass[v] = p_first * float(second[t[0]][t[1]])
            else:  # what is left of P(t) after the two-token labels that start with t
                longer = [u[1] for u in labels if len(u) == 2 and u[0] == t[0]]
                cont = float(second[t[0]][longer].sum()) if longer else 0.0
                mass[v] = p_first * (1 - cont)
        total = float(mass.sum())
        dist = (mass / total) if total > 0 else torch.full_like(mass, 1 / len(LABELS))
        preds.append(float((dist * torch.tensor(LABELS, dtype=torch.float64)).sum()))
        dists.append([round(float(x), 4) for x in dist])
    return preds, dists


@dataclass
class Detection:
    """Per context (in the order asked): its label (True: activating), the scorer's score in
    [0, 1], and the accuracy (score > 0.5 taken as yes) and ROC AUC (both NaN without contexts
    of both kinds: a feature active in every random window has no silent ones)."""

    labels: list[bool]
    scores: list[float]
    accuracy: float
    auc: float
    records: list[dict]
    order: list[int]
    unparsed: int = 0


def detect(
    backend: ChatBackend,
    explanation: str,
    activating: Sequence[Example],
    nonactivating: Sequence[Example],
    seed: int,
) -> Detection:
    """Shuffle the contexts (seeded) and ask whether the feature is active in each."""
    contexts = [*activating, *nonactivating]
    labels_all = [True] * len(activating) + [False] * len(nonactivating)
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(contexts))]
    shown = [contexts[i] for i in order]
    labels = [labels_all[i] for i in order]
    records: list[dict] = []
    unparsed = 0
    if isinstance(backend, LocalChat):
        yes = _first_tokens(backend, ("Yes", "yes", " Yes", " yes"))
        no = _first_tokens(backend, ("No", "no", " No", " no"))
        scores = []
        for ex in shown:
            messages = prompts.detection_messages(explanation, ex)
            ids = backend.prompt_ids(messages)
            probs, _ = backend.next_token_probs(ids, [len(ids) - 1])
            py, pn = float(probs[0, yes].sum()), float(probs[0, no].sum())
            scores.append(py / (py + pn) if py + pn > 0 else 0.5)
            records.append(_record(messages, {"p_yes": py, "p_no": pn}))
    else:
        messages = prompts.detection_batch_messages(explanation, shown)
        reply = backend.chat(messages, max_tokens=8 * len(shown) + 32)
        scores, unparsed = prompts.parse_detection(reply.text, len(shown))
        records.append(_record(messages, reply.raw, reply.text))
    # Both classes or no score: accuracy on one class alone would measure only recall.
    both = 0 < sum(labels) < len(labels)
    return Detection(
        labels,
        scores,
        detection_accuracy(labels, scores) if both else float("nan"),
        roc_auc(labels, scores),
        records,
        order,
        unparsed,
    )


def _first_tokens(local: LocalChat, words: Sequence[str]) -> list[int]:
    """The ids of those words that are one token each."""
    return sorted({ids[0] for ids in (local.encode(w) for w in words) if len(ids) == 1})


def score_simulation(examples: Sequence[Example], sim: Simulation) -> float:
    return simulation_score([ex.acts for ex in examples], sim.predicted)
