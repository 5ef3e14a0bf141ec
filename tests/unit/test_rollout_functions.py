"""User rollout functions: the three accepted forms are told apart by signature; others are refused with the
forms listed; TRL-form output (env_mask, extra fields) becomes Completions."""

import pytest

from reinforge.rollout.functions import FORMS, RolloutFunction, signature_form
from reinforge.rollout.types import Completions, SamplingParams


def ours(prompts, prompt_ids, generator, tokenizer, params):
    return Completions(completion_ids=[[5, 2]] * (len(prompts) * params.n), truncated=[False] * (len(prompts) * params.n))


def trl_form(prompts, trainer):
    n = len(prompts)
    return {"prompt_ids": [[1, 2]] * n, "completion_ids": [[7, 8, 2]] * (n - 1) + [[7, 8, 9]],
            "logprobs": [[-0.1, -0.2, -0.3]] * n, "env_mask": [[1, 0, 1]] * n, "answer_seen": list(range(n)),
            "episode": "same for all"}


def axolotl_form(model, processing_class, prompts, generation_config=None):
    return [f"reply to {p['messages'][-1]['content']}" for p in prompts]


def neither(prompt, model):
    return []


def test_forms_by_signature():
    assert signature_form(ours, "m.ours") == "reinforge"
    assert signature_form(trl_form, "m.trl") == "trl"
    assert signature_form(axolotl_form, "m.axo") == "axolotl"
    with pytest.raises(TypeError) as exc:
        signature_form(neither, "m.neither")
    assert "m.neither" in str(exc.value) and all(form in str(exc.value) for form in FORMS)


def test_trl_form_output(tokenizer):
    rows = [{"prompt": [{"role": "user", "content": "a"}]}, {"prompt": [{"role": "user", "content": "b"}]}]
    fn = RolloutFunction(trl_form, "m.trl")
    out = fn(rows, [[1], [2]], backend=None, tokenizer=tokenizer, params=SamplingParams(n=2, max_new_tokens=3),
             model=None, eos_token_id=2)
    assert out.loss_mask == [[1, 0, 1]] * 4 and out.prompt_ids == [[1, 2]] * 4
    assert out.truncated == [False, False, False, True]  # the last one has no EOS
    assert out.extra == {"answer_seen": [0, 1, 2, 3], "episode": ["same for all"] * 4}
    assert not fn.thread_safe


def test_axolotl_form_strings_are_tokenised_with_eos(tokenizer):
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "answer": "1"}]
    fn = RolloutFunction(axolotl_form, "m.axo")
    out = fn(rows, [[1]], backend=None, tokenizer=tokenizer, params=SamplingParams(n=2, max_new_tokens=8), model=None,
             eos_token_id=tokenizer.eos_token_id)
    assert len(out.completion_ids) == 2
    assert tokenizer.decode(out.completion_ids[0], skip_special_tokens=True) == "reply to hi"
    assert out.completion_ids[0][-1] == tokenizer.eos_token_id


def test_wrong_counts_name_the_function(tokenizer):
    def short(prompts, prompt_ids, generator, tokenizer, params):
        return Completions(completion_ids=[[1]], truncated=[False])

    with pytest.raises(ValueError, match="rollout_func m.short returned 1 completions; 4 expected"):
        RolloutFunction(short, "m.short")([{"prompt": "x"}, {"prompt": "y"}], [[1], [2]], backend=None,
                                          tokenizer=tokenizer, params=SamplingParams(n=2, max_new_tokens=2), model=None,
                                          eos_token_id=2)
