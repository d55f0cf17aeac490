"""rollouts: fine-tune language models with supervised learning and reinforcement learning.

The training API lives in `rollouts.training`; backends and their factories in
`rollouts.training.backends`.
"""

__version__ = "0.1.0"
