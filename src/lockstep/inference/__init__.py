"""The inference replica: model slots, hot swaps, and its HTTP API."""
