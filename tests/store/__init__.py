"""Tests of lockstep.store."""
