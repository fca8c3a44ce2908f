"""Post-training stages: preference optimisation, RL with verifiable rewards, distillation."""
