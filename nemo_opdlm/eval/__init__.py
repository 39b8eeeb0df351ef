"""Evaluation: verifiable tasks (GSM8K / MATH / synthetic / exact match), generation-based scoring
through the rollout sampler, the lm-eval adapter, and the synthetic arithmetic task family."""
