"""Reinforcement learning: episodes through a rollout engine, group advantages, the RL loop."""
