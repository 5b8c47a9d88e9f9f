"""Stable-Baselines3 agents for panning."""
