"""The two-phase sync protocol: the shared files, the replica-side watcher, the coordinator."""
