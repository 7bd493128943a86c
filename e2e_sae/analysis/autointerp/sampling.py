"""Which features to explain: a seeded sample of the eligible (alive) features, stratified by firing
frequency so rare and common features are both represented.

The eligible features are ranked by frequency and cut into `n_strata` contiguous groups of equal
size (quantile strata of the frequency; stratum 0 the rarest). Each stratum has its own seeded
random order, and a sample of n takes the first n // n_strata of each stratum's order (the
first n % n_strata strata take one more). So a larger n extends a smaller one with the same seed:
a rerun with more features reuses every feature already done.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sample:
    """`features` (dictionary indices) with their `strata`, and the `bounds` of each stratum:
    (lowest, highest) frequency among its eligible features."""

    features: list[int]
    strata: list[int]
    bounds: list[tuple[float, float]]


def frequency_strata(
    frequency: Sequence[float], eligible: Sequence[int], n_strata: int
) -> list[list[int]]:
    """The eligible feature indices in `n_strata` groups of (nearly) equal size by ascending
    frequency (ties broken by index); fewer groups when there are fewer eligible features."""
    elig = sorted(eligible, key=lambda i: (frequency[i], i))
    k = max(1, min(n_strata, len(elig)))
    cuts = np.linspace(0, len(elig), k + 1).round().astype(int)
    return [elig[cuts[s] : cuts[s + 1]] for s in range(k)]


def sample_features(
    frequency: Sequence[float],
    eligible: Sequence[int],
    n: int,
    seed: int = 0,
    n_strata: int = 4,
) -> Sample:
    """A stratified sample of `n` of the `eligible` features (all of them if n is larger)."""
    strata = frequency_strata(frequency, eligible, n_strata) if eligible else []
    n = min(n, sum(len(s) for s in strata))
    quotas = [0] * len(strata)
    left = n
    # Round-robin over the strata: equal shares, a stratum that runs out passes its share on.
    while left > 0:
        for s, members in enumerate(strata):
            if left > 0 and quotas[s] < len(members):
                quotas[s] += 1
                left -= 1
    features: list[int] = []
    labels: list[int] = []
    for s, members in enumerate(strata):
        order = np.random.default_rng([seed, s]).permutation(len(members))
        picked = sorted(members[i] for i in order[: quotas[s]])
        features += picked
        labels += [s] * len(picked)
    bounds = [(float(frequency[m[0]]), float(frequency[m[-1]])) for m in strata]
    return Sample(features, labels, bounds)
