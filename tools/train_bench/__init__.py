"""The parts of tools/bench_train.py: plan (what to measure and the time budget), data (the synthetic inputs),
measure, peers and prediction (the parts, run in child processes), run (the children within the budget) and
report (the JSON, the table and the goals)."""
