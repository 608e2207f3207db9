"""The trainer server: runs (simulation, finetune), discovery, publishing API and callback."""
