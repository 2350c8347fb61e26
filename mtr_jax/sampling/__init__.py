"""Jitted prefill/decode sampler: grouped sampling, stop conditions, multi-turn continuation."""

from mtr_jax.sampling.sampler import SampleOutput, Sampler, SamplerState, SamplingParams

__all__ = ["Sampler", "SamplingParams", "SampleOutput", "SamplerState"]
