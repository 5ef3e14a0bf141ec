"""EBFT's rewards of a produced rollout (structured mode): features of each prompt + generated completion and of the
prompt + its ground truth from the frozen feature network, compared per prompt group
(`reinforge.algorithms.ebft.feature_matching_rewards`).

The feature network is the policy with its adapter disabled (LoRA) or a frozen copy of the initial model (full
fine-tuning), so the scoring runs on the main thread, after the rollout is produced and before it is prepared (it
touches the training module: never from the background producer). The model's LM head is not run: the
hidden states of the decoder body at the chosen layers are concatenated and pooled.
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager

import torch

from reinforge.algorithms.ebft import feature_layer_indices, feature_matching_rewards, pool_features
from reinforge.data.collate import pad_sequences
from reinforge.rollout.types import Rollout

REWARD_NAME = "feature_matching"


def num_hidden_layers(model: torch.nn.Module) -> int:
    """Decoder depth L of a causal LM (possibly wrapped by peft and/or LogpsModel; a VLM's text config)."""
    config = getattr(model, "model", model).config
    return getattr(getattr(config, "text_config", config), "num_hidden_layers")


def decoder_body(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (no LM head) of a causal LM, possibly wrapped by peft and/or reinforge's LogpsModel."""
    inner = getattr(model, "model", model)  # LogpsModel → the HF / peft model
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return getattr(inner, inner.base_model_prefix, inner)


@torch.no_grad()
def hidden_features(body: torch.nn.Module, sequences: list[list[int]], layers: list[int], pad_token_id: int,
                    batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated hidden states at `layers` of each sequence, right-padded.

    Args: body: a decoder stack returning `hidden_states`; sequences: B token-id lists; layers: indices into the
    hidden states (0 = embeddings); pad_token_id; batch_size: sequences per forward.
    Returns: (features [B, S, len(layers)·H] float32, mask [B, S]).
    """
    device = next(body.parameters()).device
    out, masks = [], []
    width = max(len(s) for s in sequences)
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        hs = body(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True).hidden_states
        out.append(torch.cat([hs[i] for i in layers], dim=-1).float().cpu())
        masks.append(mask)
    return torch.cat(out), torch.cat(masks)


def ground_truth_ids(tokenizer, row: dict[str, Any]) -> list[int]:
    """The tokens of a row's `ground_truth` (no special tokens). Raises KeyError naming the column when it is
    missing."""
    if "ground_truth" not in row:
        raise KeyError("rl: ebft needs a `ground_truth` column (e.g. type: ebft_opencode.transform)")
    return tokenizer(str(row["ground_truth"]), add_special_tokens=False)["input_ids"]


class FeatureMatchingScorer:
    """Scores a rollout in place with EBFT's feature-matching rewards (one reward column, `feature_matching`).

    Args:
        feature_network: a callable returning a context manager that yields the feature network (e.g.
            `lambda: reference.active(module)`).
        tokenizer: tokenises each row's `ground_truth` (no special tokens).
        num_hidden_layers: depth L of the model; feature_layers: fractions (→ `feature_layer_indices`).
        embed_method, alignment_coef, diversity_coef, whiten: see `reinforge.config.ebft.EBFTConfig`.
        eos_token_ids: ids stripped from the end of generated completions (the ground truth has none), so both
            sides are pooled over text tokens only.
        chat_kwargs: extra apply_chat_template arguments (the producer's), for multi-turn rows.

    Rows with `remaining_turns` (multi-turn, `Rollout.conversations`): both sides are whole conversations rendered
    by the chat template — each completion's generated conversation against the prompt + ground truth + the
    remaining turns as written — tokenised, and pooled from the end of the prompt (as Axolotl does).
    """

    def __init__(self, feature_network: Callable[[], ContextManager[torch.nn.Module]], tokenizer, *,
                 num_hidden_layers: int, feature_layers: list[float], embed_method: str, alignment_coef: float,
                 diversity_coef: float, whiten: bool, eos_token_ids: list[int],
                 chat_kwargs: dict[str, Any] | None = None):
        self.feature_network, self.tokenizer = feature_network, tokenizer
        self.chat_kwargs = chat_kwargs or {}
        self.layers = feature_layer_indices(feature_layers, num_hidden_layers)
        self.embed_method, self.whiten = embed_method, whiten
        self.alignment_coef, self.diversity_coef = alignment_coef, diversity_coef
        self.eos = set(eos_token_ids)

    def ground_truth_ids(self, row: dict[str, Any]) -> list[int]:
        """The tokens of a row's `ground_truth` (`ground_truth_ids`)."""
        return ground_truth_ids(self.tokenizer, row)

    def render(self, conversation: list[dict[str, Any]]) -> list[int]:
        """A whole conversation → token ids (chat template, no generation prompt, no added special tokens)."""
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False,
                                                  **self.chat_kwargs)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, rollout: Rollout) -> dict[str, float]:
        """Set `rollout.rewards` ([N, 1]) and `reward_names`; returns the `ebft/*` metrics of the rollout."""
        G = rollout.num_generations
        convs = rollout.conversations or [None] * rollout.size
        gen, gen_start = [], []
        for p, c, conv in zip(rollout.prompt_ids, rollout.completion_ids, convs):
            if conv is not None:
                gen.append(self.render(conv))
            else:
                while c and c[-1] in self.eos:
                    c = c[:-1]
                gen.append(p + c if c else p)
            gen_start.append(len(p))
        gt, gt_start = [], []
        for g, row in enumerate(rollout.rows):
            p = rollout.prompt_ids[g * G]
            if convs[g * G] is not None:
                gt.append(self.render([*row["prompt"], {"role": "assistant", "content": str(row["ground_truth"])},
                                       *row["remaining_turns"]]))
            else:
                gt.append(p + self.ground_truth_ids(row))
            gt_start.append(len(p))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        with self.feature_network() as network:
            body = decoder_body(network)
            h_gen, m_gen = hidden_features(body, gen, self.layers, pad)
            h_gt, m_gt = hidden_features(body, gt, self.layers, pad)
        f_gen = pool_features(h_gen, m_gen, self.embed_method, torch.tensor(gen_start))
        f_gt = pool_features(h_gt, m_gt, self.embed_method, torch.tensor(gt_start))
        out = feature_matching_rewards(f_gen, f_gt, G, alignment_coef=self.alignment_coef,
                                       diversity_coef=self.diversity_coef, whiten=self.whiten)
        rollout.rewards = out.rewards.float().unsqueeze(1)
        rollout.reward_names = [REWARD_NAME]
        return {"ebft/alignment": out.alignment.mean().item(), "ebft/diversity": out.diversity.mean().item(),
                "ebft/cfm_loss": out.cfm_loss.mean().item(), "ebft/reward": out.rewards.mean().item()}


def adaptive_max_tokens(gt_lengths: list[int], multiplier: float, max_completion_length: int,
                        floor: int = 64) -> int:
    """Completion-length cap of a rollout from its prompts' ground-truth lengths (tokens):
    max(floor, max_p min(int(multiplier × len_p), max_completion_length)), never above max_completion_length."""
    cap = max(min(int(multiplier * n), max_completion_length) for n in gt_lengths)
    return min(max(cap, floor), max_completion_length)
