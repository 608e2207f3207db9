"""The cluster view: replicas from discovery (static URLs, DNS, the Kubernetes API) and from heartbeats."""
