"""The spec: plain PyTorch of CRATE's equations with the official code's names, shapes and state_dict keys.

Simple on purpose, never optimised, never imported by ``crate_kernels``. Tests and benchmarks compare against it.
"""
