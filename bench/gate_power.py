"""The adaptive gate against one look: simulated candidates on a 0/1 task, paired with their
incumbent on LawBench's val sizes (150 items first, 432 usable), 20 % of pairs discordant.

    python bench/gate_power.py [--reps 4000]

For each true gain (0: a null candidate) it prints the share accepted and the mean val items
scored, for one look at 150 items at alpha 0.1, the adaptive gate's plans (Pocock and
O'Brien-Fleming spending, 2 more looks), and three looks at the single-look alpha (what spending
prevents), all with the gate's own exact McNemar test. JSON: bench/results/gate_power.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sialoop.gate import mcnemar_exact
from sialoop.sequential import SequentialPlan, plan, run_looks

ALPHA, FIRST, USABLE, DISCORDANT = 0.1, 150, 432, 0.2
GAINS = (0.0, 0.02, 0.04, 0.06)


def simulate(seq: SequentialPlan, gain: float, reps: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    accepted = items = 0
    win, loss = (DISCORDANT + gain) / 2, (DISCORDANT - gain) / 2
    for _ in range(reps):
        u = rng.random(seq.looks[-1])
        d = np.where(u < win, 1, np.where(u < win + loss, -1, 0))

        def look(n: int, nominal: float, d: np.ndarray = d) -> tuple[bool, float, int]:
            wins, losses = int(np.sum(d[:n] > 0)), int(np.sum(d[:n] < 0))
            p = mcnemar_exact(wins, losses)
            return p < nominal and wins > losses, p, n

        result, _ = run_looks(seq, look, lambda r: r[0], lambda r, bound: r[1] < bound)
        accepted += result[0]
        items += result[2]
    return accepted / reps, items / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=4000)
    args = parser.parse_args()
    pocock = plan(FIRST, USABLE, 2, ALPHA, "pocock")
    plans = {
        "one look at 150": plan(FIRST, FIRST, 0, ALPHA),
        "adaptive, pocock": pocock,
        "adaptive, obrien-fleming": plan(FIRST, USABLE, 2, ALPHA, "obrien-fleming"),
        "3 looks at alpha 0.1 (naive)": pocock.model_copy(update={"nominal": (ALPHA,) * 3}),
    }
    rows = []
    print(f"{'plan':30} {'nominal alphas':24} " + " ".join(f"gain {g:+.2f}" for g in GAINS))
    for name, seq in plans.items():
        cells = [simulate(seq, g, args.reps, seed=i) for i, g in enumerate(GAINS)]
        nominal = "/".join(f"{a:.3f}" for a in seq.nominal)
        print(f"{name:30} {nominal:24} " + " ".join(f"{a:.3f}@{n:3.0f}" for a, n in cells))
        rows.append(
            {
                "plan": name,
                "looks": list(seq.looks),
                "nominal": list(seq.nominal),
                "accepted": {f"{g:+.2f}": a for g, (a, _) in zip(GAINS, cells, strict=True)},
                "mean_items": {f"{g:+.2f}": n for g, (_, n) in zip(GAINS, cells, strict=True)},
            }
        )
    print("cells: share accepted @ mean val items scored; gain +0.00 is the false-acceptance rate")
    out = Path(__file__).parent / "results" / "gate_power.json"
    out.write_text(
        json.dumps({"reps": args.reps, "discordant": DISCORDANT, "rows": rows}, indent=1)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
