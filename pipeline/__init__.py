"""Everything around the method: configs, data, training, checkpoints, tracking, evaluation, CLI."""
