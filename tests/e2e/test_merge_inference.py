"""`reinforge merge-lora` and `reinforge inference` on a tiny random model.

The adapter is made with peft and given random non-zero LoRA B weights (a fresh adapter is a no-op, so a merge
that dropped it would still pass), saved as `reinforge train` saves it; one test trains it for real. References
are computed here with plain transformers/peft `generate`, never with reinforge's own inference code.
"""

import io
import json
import shutil

import pytest
import torch
import yaml

from reinforge.cli import main

from conftest import DATA_DIR

DATASET = {
    "path": str(DATA_DIR / "dpo_en_demo.json"),
    "type": "chat_template.default",
    "field_messages": "conversations",
    "message_property_mappings": {"role": "from", "content": "value"},
    "roles": {"user": ["human"], "assistant": ["gpt"]},
}
LORA = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True}
PROMPTS = ["Hello, who are you?", "Write a haiku about the sea.", "What is 2 + 2?"]


def write_config(tmp_path, model_dir, name="config.yaml", **extra):
    cfg = {"base_model": str(model_dir), "rl": "dpo", "datasets": [DATASET], "sequence_len": 128,
           "micro_batch_size": 2, "max_steps": 2, "learning_rate": 1e-2, "lr_scheduler": "constant",
           "output_dir": str(tmp_path / "out"), "use_tensorboard": False, "chat_template": "chatml", **extra}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def make_adapter(cfg_path, seed=0, std=1.0):
    """A LoRA adapter with random A and B, saved in output_dir with reinforge's own `save_model`."""
    from peft import get_peft_model

    from reinforge.config import load_config
    from reinforge.models.loading import load_causal_lm, load_tokenizer, lora_config
    from reinforge.training.checkpoint import save_model

    cfg = load_config(cfg_path)
    model = get_peft_model(load_causal_lm(cfg.base_model, cfg), lora_config(cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    save_model(model, load_tokenizer(cfg), cfg, cfg.output_dir)
    return cfg


@pytest.fixture
def lora_run(tmp_path, tiny_model_dir):
    cfg_path = write_config(tmp_path, tiny_model_dir, **LORA)
    make_adapter(cfg_path)
    return cfg_path, tmp_path / "out"


def peft_model(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir)).eval()


def chatml_tokenizer(model_dir):
    from transformers import AutoTokenizer

    from reinforge.models.chat_templates import CHATML

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = CHATML
    return tok


def prompt_ids(tok, messages):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


def greedy(model, tok, messages, n=12):
    ids = prompt_ids(tok, messages)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# --- merge-lora -----------------------------------------------------------------------------------------------


def test_merged_model_loads_plainly_and_generates_as_the_peft_model(lora_run, tiny_model_dir, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reinforge.models.chat_templates import CHATML

    cfg_path, out = lora_run
    assert main(["merge-lora", str(cfg_path)]) == 0
    merged_dir = out / "merged"
    assert capsys.readouterr().out.strip() == str(merged_dir)
    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter_config.json").exists()
    assert not (out / "merged.tmp").exists()

    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert all(p.dtype == torch.float32 for p in load_file(merged_dir / "model.safetensors").values())
    assert not any("lora" in k for k in load_file(merged_dir / "model.safetensors"))
    tok = AutoTokenizer.from_pretrained(merged_dir)
    assert tok.chat_template == CHATML  # the config's chat_template, not the tokenizer's own SmolLM2 template
    assert tok.pad_token is not None

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ref = peft_model(tiny_model_dir, out)
    ids = prompt_ids(tok, [{"role": "user", "content": PROMPTS[0]}])
    with torch.no_grad():
        l_merged, l_peft, l_base = (m(ids).logits for m in (merged, ref, base))
    assert (l_peft - l_base).abs().max() > 1e-2  # the adapter changes the model: the merge is not vacuous
    assert torch.allclose(l_merged, l_peft, atol=1e-4), (l_merged - l_peft).abs().max()

    differs_from_base = False
    for p in PROMPTS:
        messages = [{"role": "user", "content": p}]
        want = greedy(ref, tok, messages)
        assert len(want) > 0
        assert greedy(merged, tok, messages) == want
        differs_from_base |= greedy(base, tok, messages) != want
    assert differs_from_base


def test_merge_from_lora_model_dir_in_bf16_with_overrides_after_the_flag(lora_run, tmp_path, tiny_model_dir, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg_path, out = lora_run
    elsewhere = tmp_path / "adapter-copy"
    shutil.copytree(out, elsewhere)
    shutil.rmtree(out)
    assert main(["merge-lora", str(cfg_path), "--lora-model-dir", str(elsewhere), "bf16=true"]) == 0
    merged_dir = out / "merged"  # output_dir/merged, as Axolotl, whichever adapter directory
    weights = load_file(merged_dir / "model.safetensors")
    assert weights and all(p.dtype == torch.bfloat16 for p in weights.values())
    assert json.loads((merged_dir / "config.json").read_text())["dtype"] == "bfloat16"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    ref = peft_model(tiny_model_dir, elsewhere)
    tok = chatml_tokenizer(tiny_model_dir)
    ids = prompt_ids(tok, [{"role": "user", "content": PROMPTS[1]}])
    with torch.no_grad():
        diff = (merged(ids).logits - ref(ids).logits).abs().max()
    assert 0 < diff < 0.5  # bfloat16 rounding only


def test_trained_adapter_merges(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    cfg_path = write_config(tmp_path, tiny_model_dir, **LORA)
    assert main(["train", str(cfg_path)]) == 0
    out = tmp_path / "out"
    assert main(["merge-lora", str(cfg_path)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    ref = peft_model(tiny_model_dir, out)
    tok = chatml_tokenizer(out / "merged")
    ids = prompt_ids(tok, [{"role": "user", "content": PROMPTS[0]}])
    with torch.no_grad():
        l_merged, l_peft = merged(ids).logits, ref(ids).logits
        l_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
    assert (l_peft - l_base).abs().max() > 1e-3  # two steps moved the adapter
    assert (l_merged - l_peft).abs().max() < 1e-5
    for p in PROMPTS[:2]:
        messages = [{"role": "user", "content": p}]
        assert greedy(merged, tok, messages) == greedy(ref, tok, messages)


def test_merge_errors_are_one_line_and_say_what_to_do(tmp_path, tiny_model_dir, capsys):
    full = write_config(tmp_path, tiny_model_dir, name="full.yaml")
    assert main(["merge-lora", str(full)]) == 2
    err = one_line_error(capsys)
    assert "no `adapter:`" in err and "--lora-model-dir" in err

    lora = write_config(tmp_path, tiny_model_dir, name="lora.yaml", **LORA)
    assert main(["merge-lora", str(lora)]) == 1
    err = one_line_error(capsys)
    assert str(tmp_path / "out") in err and "does not exist" in err and f"reinforge train {lora}" in err

    assert main(["merge-lora", str(lora), "--lora-model-dir", str(tiny_model_dir)]) == 1
    err = one_line_error(capsys)
    assert str(tiny_model_dir) in err and "not a peft adapter" in err and "full model" in err

    (tmp_path / "empty").mkdir()
    assert main(["merge-lora", str(lora), "--lora-model-dir", str(tmp_path / "empty")]) == 1
    assert "no adapter_config.json" in one_line_error(capsys)
    assert not (tmp_path / "out" / "merged").exists()


# --- inference ------------------------------------------------------------------------------------------------


def test_inference_prompt_prints_the_greedy_completion(lora_run, tiny_model_dir, capsys):
    cfg_path, out = lora_run
    ref, tok = peft_model(tiny_model_dir, out), chatml_tokenizer(tiny_model_dir)
    for p in PROMPTS[:2]:
        assert main(["inference", str(cfg_path), "--prompt", p, "--temperature", "0", "--max-new-tokens", "12"]) == 0
        captured = capsys.readouterr()
        want = tok.decode(greedy(ref, tok, [{"role": "user", "content": p}]), skip_special_tokens=True)
        assert want.strip()
        assert captured.out == want + "\n"
        assert "base model" not in captured.err


def test_inference_streams_token_by_token(lora_run, tiny_model_dir):
    from reinforge.config import load_config
    from reinforge.models.inference import ChatSession, generation_settings, load_inference_model
    from reinforge.models.loading import load_tokenizer

    class Recorder(io.StringIO):
        writes: list[str] = []

        def write(self, s):
            self.writes.append(s)
            return super().write(s)

    cfg_path, out = lora_run
    cfg = load_config(cfg_path)
    model, note = load_inference_model(cfg)
    assert note is None
    rec = Recorder()
    settings = generation_settings(cfg, temperature=0, max_new_tokens=12)
    session = ChatSession(model, load_tokenizer(cfg), settings, out=rec)
    answer = session.reply(PROMPTS[0])
    assert rec.getvalue() == answer + "\n"
    assert len([w for w in rec.writes if w]) >= 3  # written piece by piece while generating, not once at the end


def test_inference_chat_reads_stdin_and_keeps_the_history(lora_run, tiny_model_dir, capsys, monkeypatch):
    cfg_path, out = lora_run
    first, second = "Hi there.", "Tell me more about it."
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{first}\n{second}\n\nnever read\n"))  # the empty line ends it
    assert main(["inference", str(cfg_path), "--temperature", "0", "--max-new-tokens", "10"]) == 0
    got = capsys.readouterr().out

    ref, tok = peft_model(tiny_model_dir, out), chatml_tokenizer(tiny_model_dir)
    a1 = tok.decode(greedy(ref, tok, [{"role": "user", "content": first}], 10), skip_special_tokens=True)
    history = [{"role": "user", "content": first}, {"role": "assistant", "content": a1},
               {"role": "user", "content": second}]
    a2 = tok.decode(greedy(ref, tok, history, 10), skip_special_tokens=True)
    alone = tok.decode(greedy(ref, tok, [{"role": "user", "content": second}], 10), skip_special_tokens=True)
    assert a2 != alone  # so the comparison below tells whether the history was used
    assert got == f"{a1}\n{a2}\n"


def test_inference_stops_at_exit_and_eof(lora_run, capsys, monkeypatch):
    cfg_path, _ = lora_run
    args = ["--temperature", "0", "--max-new-tokens", "6"]
    assert main(["inference", str(cfg_path), "--prompt", "Hello", *args]) == 0
    once = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nexit\nnot answered\n"))
    assert main(["inference", str(cfg_path), *args]) == 0
    assert capsys.readouterr().out == once
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["inference", str(cfg_path)]) == 0
    assert capsys.readouterr().out == ""


def test_inference_full_model_then_base_model_with_a_note(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM

    from reinforge.config import load_config
    from reinforge.models.loading import load_tokenizer

    # a run trained in full: output_dir holds the model (here: a merged adapter, i.e. a different model)
    lora = write_config(tmp_path, tiny_model_dir, name="lora.yaml", **LORA)
    make_adapter(lora, seed=3)
    assert main(["merge-lora", str(lora)]) == 0
    capsys.readouterr()
    full = write_config(tmp_path, tiny_model_dir, name="full.yaml", output_dir=str(tmp_path / "out" / "merged"))
    tok = load_tokenizer(load_config(full))
    messages = [{"role": "user", "content": PROMPTS[2]}]
    want_full = tok.decode(greedy(AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged").eval(), tok,
                                  messages), skip_special_tokens=True)
    want_base = tok.decode(greedy(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tok, messages),
                           skip_special_tokens=True)
    assert want_full != want_base

    args = ["--prompt", PROMPTS[2], "--temperature", "0", "--max-new-tokens", "12"]
    assert main(["inference", str(full), *args]) == 0
    captured = capsys.readouterr()
    assert captured.out == want_full + "\n" and "note:" not in captured.err

    empty = write_config(tmp_path, tiny_model_dir, name="empty.yaml", output_dir=str(tmp_path / "nothing"))
    assert main(["inference", str(empty), *args]) == 0
    captured = capsys.readouterr()
    assert captured.out == want_base + "\n"
    assert f"no trained model in {tmp_path / 'nothing'}" in captured.err and "base model" in captured.err

    no_adapter = write_config(tmp_path, tiny_model_dir, name="noadapter.yaml", output_dir=str(tmp_path / "nothing"),
                              **LORA)
    assert main(["inference", str(no_adapter), *args]) == 0
    captured = capsys.readouterr()
    assert captured.out == want_base + "\n" and "no trained adapter" in captured.err

    assert main(["inference", str(no_adapter), "--lora-model-dir", str(tmp_path / "nothing"), *args]) == 1
    assert str(tmp_path / "nothing") in one_line_error(capsys)


def test_sampling_settings_default_from_trl_and_flags_override(tmp_path, tiny_model_dir, capsys):
    from reinforge.config import load_config
    from reinforge.models.inference import generation_settings

    cfg = load_config(write_config(tmp_path, tiny_model_dir, trl={"temperature": 0.7, "top_p": 0.9, "top_k": 20,
                                                                 "max_completion_length": 33}))
    s = generation_settings(cfg)
    assert (s.temperature, s.top_p, s.top_k, s.max_new_tokens) == (0.7, 0.9, 20, 33)
    kw = s.generate_kwargs()
    assert kw["do_sample"] and kw["temperature"] == 0.7 and kw["top_k"] == 20 and kw["max_new_tokens"] == 33
    s = generation_settings(cfg, temperature=1.3, top_p=0.5, top_k=0, max_new_tokens=5)
    assert (s.temperature, s.top_p, s.top_k, s.max_new_tokens) == (1.3, 0.5, 0, 5)
    assert generation_settings(cfg, temperature=0).generate_kwargs()["do_sample"] is False
    assert generation_settings(load_config(write_config(tmp_path, tiny_model_dir))).generate_kwargs()["top_k"] == 0

    cfg_path = write_config(tmp_path, tiny_model_dir)
    assert main(["inference", str(cfg_path), "--prompt", "x", "--top-p", "1.5"]) == 2
    assert "--top-p" in one_line_error(capsys)


def test_inference_sampling_is_seeded(lora_run, capsys):
    cfg_path, _ = lora_run
    runs = []
    for seed in (1, 1, 2):
        assert main(["inference", str(cfg_path), "--prompt", PROMPTS[0], "--max-new-tokens", "12", f"seed={seed}",
                     "trl.temperature=1.5"]) == 0
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1] != runs[2]
