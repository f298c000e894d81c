"""The `siim-jax` verbs: one module per command, each `add_arguments(parser)` and `run(args) -> int` (and
`parse_args` where `--config` is parsed by config_flags). argparse and printing for people live here only; each
command turns its arguments into calls of the typed library API."""
