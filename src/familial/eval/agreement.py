"""How often a member's top-1 token is the full member's, on held-out text.

A member that agrees with the full member on most tokens can stand in for it (early exit,
speculative drafting); the rate is counted per window so it gets a bootstrap interval like
the loss. The pairwise matrix shows the same between every two members.
"""

from __future__ import annotations

import numpy as np
import torch


class AgreementCounter:
    """Accumulates, per window, the target tokens where each exit's top-1 matches the reference's."""

    def __init__(self, exits: list[int], reference: int) -> None:
        if reference not in exits:
            raise ValueError(f"reference exit {reference} is not among the evaluated exits {exits}")
        self.exits, self.reference = list(exits), reference
        self.per_window: list[np.ndarray] = []
        self.pairwise = np.zeros((len(exits), len(exits)), dtype=np.int64)

    def add(self, top1: dict[int, torch.Tensor], window: torch.Tensor, num_windows: int) -> None:
        """top1: {exit: (M,) predicted ids} at M target positions; window: (M,) window index of each."""
        stacked = torch.stack([top1[e] for e in self.exits])            # (K, M)
        same = stacked[:, None, :] == stacked[None, :, :]                # (K, K, M)
        self.pairwise += same.sum(-1).cpu().numpy()
        matches = same[self.exits.index(self.reference)].to(torch.float64)  # (K, M)
        counts = torch.zeros(len(self.exits), num_windows, dtype=torch.float64, device=matches.device)
        counts.index_add_(1, window, matches)
        self.per_window.append(counts.cpu().numpy())

    def window_matches(self) -> np.ndarray:
        """(K, W) tokens per window where the exit agrees with the reference."""
        return np.concatenate(self.per_window, axis=1)

    def matrix(self) -> np.ndarray:
        """(K, K) agreement rate between every two exits over all target tokens."""
        total = self.pairwise[0, 0]
        return self.pairwise / max(total, 1)
