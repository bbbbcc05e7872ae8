"""Benchmarks: baselines (ORT in-memory QMoE/MoE, naive, mmap), the roofline, storage profiles."""
