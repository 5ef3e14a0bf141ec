"""Generation backends for online RL: an interface, the in-process backend, (later) a vLLM HTTP backend."""

from reinforge.generation.base import Generator, Rollout, SamplingParams

__all__ = ["Generator", "Rollout", "SamplingParams"]
