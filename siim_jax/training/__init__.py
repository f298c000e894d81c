"""Training: the flat loop (`loop.train_and_evaluate`), the train state and its jitted steps, optimizers, losses,
checkpoints, the input monitor and metric logging. Imports the foundation modules, data and models only."""
