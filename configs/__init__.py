"""The training recipes, shipped with the package: `siim-jax train --config NAME[:ARG]` loads `NAME.py` from here.

Each recipe is a plain ml_collections config file defining `get_config(arg=None)`, starting from
`defaults.default_config()`; none imports the data pipeline or JAX.
"""
