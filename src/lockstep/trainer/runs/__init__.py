"""Runs and their kinds (simulation, finetune, job): the manager, their records on disk, policy, rollouts,
rewards."""
