"""The training recipes, at the repository's top level and shipped in the wheel as `siim_jax.configs`:
`siim-jax train --config NAME[:ARG]` loads `NAME.py` from here.

Each recipe is a plain ml_collections config file defining `get_config(arg=None)`, starting from
`defaults.default_config()`; none imports the data pipeline or JAX.
"""
