"""Runs and their kinds (simulation, finetune): the manager, their records on disk, policy, rollouts, rewards."""
