"""The training command from a checkout: `python dev/integration_training/train.py CONFIG.py ...`.

The same as `rollouts train CONFIG.py ...` (see `rollouts.recipes.train`); kept as a file so that
`torchrun` can launch it and so that the shipped configs sit beside it.
"""

from rollouts.recipes.train import main

if __name__ == "__main__":
    main()
