"""Model references, the built-in models and safe loading."""
