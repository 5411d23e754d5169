"""Speed benchmarks of editbench against plain diffusers/PyTorch references."""
