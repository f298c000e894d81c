"""The parts of tools/bench_train.py: plan (what to measure), measure and peers (the parts, run in child
processes), run (the children within the budget) and report (the JSON, the table and the goals)."""
