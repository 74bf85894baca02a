"""Bounded fuzz run of the loader, recipe parser, data loader and CLI (tests/fuzz_targets.py).

    python bench/fuzz.py --seconds 300

Each target gets an equal share of the time budget; every case is classified (``ok``,
``exit 2: <what>``, ``exit 3``); a case that raises anything else, leaves a file behind or
writes outside its scratch folder is a bug (printed, and the run exits 1). Prints the case
count and the outcome classes per target.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests import fuzz_targets as ft  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300)
    args = parser.parse_args()
    share = args.seconds / 4
    bugs = 0
    with tempfile.TemporaryDirectory(prefix="onnxcomp-fuzz-") as tmp:
        work = Path(tmp)
        targets = [("model loader", ft.model_cases, ft.load_model_target),
                   ("recipe parser", ft.recipe_cases, ft.recipe_target),
                   ("data loader", ft.data_cases, ft.data_target),
                   ("cli", None, ft.cli_target)]
        for name, cases, target in targets:
            outcomes: Counter[str] = Counter()
            deadline = time.monotonic() + share

            run = _runner(cases, target, outcomes, deadline, work)
            start = time.monotonic()
            try:
                run()
            except BaseException:  # noqa: BLE001 - a bug: report it and go on with the next target
                bugs += 1
                outcomes["BUG"] += 1
                traceback.print_exc(limit=3)
            print(f"{name}: {sum(outcomes.values())} cases in {time.monotonic() - start:.0f} s")
            for outcome, count in outcomes.most_common():
                print(f"  {count:6d}  {outcome}")
    return 1 if bugs else 0


def _runner(cases, target, outcomes, deadline, work):
    @settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data):
        # draw before looking at the clock: a replay (hypothesis shrinking a failure) must draw the
        # same data, or it reports FlakyStrategyDefinition instead of the failure
        folder = Path(tempfile.mkdtemp(dir=work))
        case = data.draw(cases if cases is not None else ft.cli_cases(folder, heavy=True))
        if time.monotonic() > deadline:
            return
        outcomes[target(case, folder)] += 1

    return run


if __name__ == "__main__":
    sys.exit(main())
