"""PINN fine-tuning: problem families with a parameter, references, methods and the training run."""
