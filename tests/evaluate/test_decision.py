"""decision.decide's prior correction at the edges."""

from __future__ import annotations

import numpy as np

from vlmtax.evaluate.decision import decide


def test_a_value_never_seen_in_training_does_not_win_every_row():
    probs = np.array([[0.90, 0.09, 0.01], [0.05, 0.90, 0.05], [0.02, 0.03, 0.95]])
    prior = np.array([0.6, 0.4, 0.0])  # value 2 is declared in the taxonomy but absent from training
    for tau in (0.25, 0.5, 1.0):
        assert decide(probs, prior, tau).tolist() == [0, 1, 2]
    # A rare seen value still gets its correction: it wins a close call against a common one.
    assert decide(np.array([[0.55, 0.45, 0.0]]), np.array([0.9, 0.1, 0.0]), 1.0).tolist() == [1]
    assert decide(probs, np.zeros(3), 1.0).tolist() == [0, 1, 2]  # no prior at all: the plain argmax
