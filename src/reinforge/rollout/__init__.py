"""The rollout layer of online RL: types, generation backends, weight sync, producer, main-thread preparation.

- `types`: `SamplingParams`, `Completions` (a backend's or rollout function's output), `Rollout` (scored).
- backends: `inprocess.InProcessBackend` (generate() on the policy), `vllm.VLLMServerBackend` (HTTP).
- `sync`: `WeightSync` implementations moving the policy's weights to a backend (LoRA files, full weights).
- `producer.RolloutProducer`: generate and score only (background-thread safe with a thread-safe backend).
- `prepare.RolloutPreparer`: gather, advantages, old/reference forwards, sampler weights (main thread).
- `stream.RolloutStream`: micro-batches from successive rollouts, resumable.
- `functions`: user rollout functions in reinforge's, TRL 1.16's and Axolotl's forms.
"""

from reinforge.rollout.types import Completions, Rollout, SamplingParams

__all__ = ["Completions", "Rollout", "SamplingParams"]
