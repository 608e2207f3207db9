"""Lockstep: serve a language model from several replicas and replace it while serving, in lockstep."""

__version__ = "0.1.0"
