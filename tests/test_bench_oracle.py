"""The oracle prefetch benchmark's predictor (edgemoe_ort.bench.oracle): its logits carry the true next-layer
experts at the chosen accuracy, in the shapes the stacked-gates inputs of make_moe_graph take."""

from __future__ import annotations

import numpy as np

from edgemoe_ort.bench.oracle import oracle_feeds, oracle_markdown


def _steps(L: int = 4, T: int = 3, E: int = 8, n: int = 20) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(0)
    steps = []
    for _ in range(n):
        per = []
        for _ in range(L):
            idx = np.stack([rng.choice(E, 2, replace=False) for _ in range(T)]).astype(np.int64)
            per.append((idx, np.full((T, 2), 0.5, np.float32)))
        steps.append(per)
    return steps


def test_perfect_predictor_marks_exactly_the_next_layers_experts() -> None:
    steps = _steps()
    feeds = oracle_feeds(steps, 8, lookahead=2, accuracy=1.0)
    assert len(feeds) == len(steps)
    assert sorted(feeds[0]) == ["next_logits_0", "next_logits_1", "next_logits_2"]  # not the last layer
    assert feeds[0]["next_logits_0"].shape == (3, 2, 8) and feeds[0]["next_logits_2"].shape == (3, 1, 8)
    for s, f in zip(steps, feeds, strict=True):
        for li in range(3):
            z = f[f"next_logits_{li}"]
            for j in range(z.shape[1]):
                for t in range(3):
                    assert set(np.flatnonzero(z[t, j])) == set(s[li + 1 + j][0][t].tolist())


def test_accuracy_is_the_share_of_true_experts_kept() -> None:
    steps = _steps(n=200)
    for acc in (0.0, 0.6):
        feeds = oracle_feeds(steps, 8, lookahead=1, accuracy=acc, seed=3)
        kept = total = 0
        for s, f in zip(steps, feeds, strict=True):
            for li in range(3):
                z = f[f"next_logits_{li}"][:, 0]
                for t in range(3):
                    marked = set(np.flatnonzero(z[t]))
                    assert len(marked) <= 2
                    kept += len(marked & set(s[li + 1][0][t].tolist()))
                    total += 2
        assert abs(kept / total - acc) < 0.05, (acc, kept / total)


def test_markdown_row_per_mode() -> None:
    row = {"decode_s_per_token": 0.1, "x_none_paired": 1.2, "stall_s_per_token": 0.01, "bytes_per_token": 2e6,
           "hits_per_token": 30.0, "prefetch_issued_per_token": 5.0, "prefetch_used_per_token": 4.0,
           "prefetch_declined_per_token": 1.0, "ratio_to_roofline_paired": 0.9}
    res = {"profile": None, "budget": "25%", "tokens": 24, "repeats": 3, "depth": 1, "load": [1.0, 1.2],
           "rows": [{"mode": "none", **row}, {"mode": "oracle:1", **row}]}
    lines = oracle_markdown(res)
    assert lines[-1].startswith("| oracle:1 | 100.0 | 1.20 | 10.0 | 2.0 | 30.0 | 5.0 / 4.0 / 1.0 | 0.90 |")
    assert "| none |" in lines[-2] and "| – |" in lines[-2]
