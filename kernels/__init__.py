"""kvtool.kernels: Triton kernels for converted models' hot paths, each with a PyTorch reference beside it."""
