"""Triton kernels and their pure-torch references (installed as `s4d_dist.kernels`)."""
