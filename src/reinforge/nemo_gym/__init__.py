"""NeMo Gym environments as the reward (single-turn `/verify`) or the rollouts (multi-turn agent `/run`) of GRPO.

`servers`: start/reuse/discover/stop NeMo Gym's servers; `responses`: completions ↔ OpenAI Responses objects;
`source`: the single-turn rollout source; `multi_turn`: the agent-driven one. See docs/nemo_gym.md.
"""
