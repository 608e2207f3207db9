"""Training as a Kubernetes Job: the template a job run starts from (``template``), the Kubernetes API calls it
makes (``kube``), and the TRL script its pods run by default (``worker``)."""
