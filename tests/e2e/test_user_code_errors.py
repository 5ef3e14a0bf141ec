"""An exception in the user's code (reward function, rollout function, dataset transform) ends `reinforge train`
with one line naming the function, where and the exception, leaves a checkpoint that resumes, and shows the
traceback only with --debug / REINFORGE_DEBUG=1. Runs the real command line in a subprocess (its real stderr)."""

import json
import os
import subprocess
import sys

import yaml

RAISES_ON_STEP_2 = '''
CALLS = {"n": 0}


def even_tokens(prompts, completions, completion_ids, **kwargs):
    CALLS["n"] += 1  # one call per rollout, one rollout per step: the second call is step 2
    if CALLS["n"] >= 2:
        raise ValueError("boom")
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]
'''

FIXED = '''
def even_tokens(prompts, completions, completion_ids, **kwargs):
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]
'''

ROLLOUT_RAISES_ON_STEP_2 = '''
CALLS = {"n": 0}


def generate(prompts, prompt_ids, generator, tokenizer, params):
    CALLS["n"] += 1
    if CALLS["n"] >= 2:
        raise RuntimeError("sampler gave up")
    return generator.generate(prompt_ids, params)
'''


def setup(tmp_path, tiny_model_dir, **trl):
    rows = [{"prompt": [{"role": "user", "content": f"Write something about topic {i}."}], "topic": i} for i in range(16)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = {"base_model": str(tiny_model_dir), "rl": "grpo", "datasets": [{"path": "prompts.jsonl"}],
           "trl": {"num_generations": 8, "max_completion_length": 8, "top_k": 20,
                   "reward_funcs": ["my_rewards.even_tokens"], **trl},
           "micro_batch_size": 8, "max_steps": 4, "learning_rate": 1e-2, "lr_scheduler": "constant",
           "output_dir": "out", "use_tensorboard": False, "seed": 1}
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(cfg))
    return "grpo.yaml"


def train(tmp_path, *args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reinforge.cli", "train", *args], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, timeout=600)


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def assert_stopped_in_one_line(tmp_path, run, line: str) -> None:
    """Exit 1, `line` as stderr's last line, no traceback, and the checkpoint of step 1 written."""
    assert run.returncode == 1, run.stderr
    assert last_line(run.stderr) == line
    assert "Traceback" not in run.stderr
    assert (tmp_path / "out" / "checkpoint-1" / "trainer_state.json").is_file()


def test_raising_reward_function_stops_in_one_line_with_a_checkpoint_that_resumes(tmp_path, tiny_model_dir):
    (tmp_path / "my_rewards.py").write_text(RAISES_ON_STEP_2)
    cfg = setup(tmp_path, tiny_model_dir)
    assert_stopped_in_one_line(tmp_path, train(tmp_path, cfg), (
        "error: reward function my_rewards.even_tokens raised ValueError('boom') at step 2; checkpoint of step 1 "
        "written to out/checkpoint-1; fix my_rewards.even_tokens and resume with resume_from_checkpoint=true"))

    (tmp_path / "my_rewards.py").write_text(FIXED)
    resumed = train(tmp_path, cfg, "resume_from_checkpoint=true")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from out/checkpoint-1 at step 1" in resumed.stderr
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_debug_flag_shows_the_sample_and_traceback_first(tmp_path, tiny_model_dir):
    (tmp_path / "my_rewards.py").write_text(RAISES_ON_STEP_2)
    run = train(tmp_path, setup(tmp_path, tiny_model_dir), "--debug")
    assert run.returncode == 1, run.stderr
    assert last_line(run.stderr).startswith("error: reward function my_rewards.even_tokens raised ValueError('boom') "
                                            "at step 2; checkpoint of step 1 written")
    before = run.stderr[:run.stderr.rindex("error: reward function")]
    assert "Traceback (most recent call last)" in before and 'raise ValueError("boom")' in before
    assert "reward function 'even_tokens' raised on completion 0 of 8" in before and "prompt: " in before


def test_raising_rollout_function_stops_in_one_line_with_a_checkpoint(tmp_path, tiny_model_dir):
    (tmp_path / "my_rewards.py").write_text(FIXED)
    (tmp_path / "my_rollout.py").write_text(ROLLOUT_RAISES_ON_STEP_2)
    run = train(tmp_path, setup(tmp_path, tiny_model_dir, rollout_func="my_rollout.generate"))
    assert_stopped_in_one_line(tmp_path, run, (
        "error: rollout function my_rollout.generate raised RuntimeError('sampler gave up') at step 2; checkpoint "
        "of step 1 written to out/checkpoint-1; fix my_rollout.generate and resume with resume_from_checkpoint=true"))


def test_raising_transform_names_the_transform_file_and_row(tmp_path, tiny_model_dir):
    (tmp_path / "my_rewards.py").write_text(FIXED)
    (tmp_path / "my_tf.py").write_text(
        "def transform(cfg, dataset_idx=0):\n"
        "    def fn(row):\n"
        "        if row['topic'] == 3:\n"
        "            raise ValueError('bad row')\n"
        "        return {'prompt': row['prompt']}\n"
        "    return fn\n")
    cfg = setup(tmp_path, tiny_model_dir)
    data = yaml.safe_load((tmp_path / cfg).read_text())
    data["datasets"][0]["type"] = "my_tf.transform"
    (tmp_path / cfg).write_text(yaml.safe_dump(data))
    run = train(tmp_path, cfg)
    assert run.returncode == 2, run.stderr
    assert last_line(run.stderr) == ("error: prompts.jsonl, row 3: dataset transform my_tf.transform raised "
                                     "ValueError('bad row') (the row's columns: prompt, topic)")
    assert "Traceback" not in run.stderr
    debug = train(tmp_path, cfg, REINFORGE_DEBUG="1")
    assert debug.returncode == 2 and last_line(debug.stderr) == last_line(run.stderr)
    assert "Traceback (most recent call last)" in debug.stderr and "raise ValueError('bad row')" in debug.stderr


RAISES_ON_EVAL_PROMPTS = '''
CALLS = {"train": 0}


def even_tokens(prompts, completions, completion_ids, topic, **kwargs):
    if min(topic) < 100:
        CALLS["train"] += 1  # one call per training step
    elif CALLS["train"] >= 2:  # the held-out prompts, after step 2 (the evaluation before training passes)
        raise ValueError("eval boom")
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]
'''


def test_reward_function_raising_in_the_evaluation_names_it_and_checkpoints(tmp_path, tiny_model_dir):
    """A reward function that raises on the held-out prompts stops the run in one line naming the evaluation and
    its step, with a checkpoint of that step (its update done) that resumes."""
    (tmp_path / "my_rewards.py").write_text(RAISES_ON_EVAL_PROMPTS)
    held = [{"prompt": [{"role": "user", "content": f"Held-out topic {i}."}], "topic": 100 + i} for i in range(2)]
    (tmp_path / "held.jsonl").write_text("\n".join(json.dumps(r) for r in held))
    cfg = setup(tmp_path, tiny_model_dir)
    data = yaml.safe_load((tmp_path / cfg).read_text())
    data.update(test_datasets=[{"path": "held.jsonl"}], eval_steps=2)
    (tmp_path / cfg).write_text(yaml.safe_dump(data))
    run = train(tmp_path, cfg)
    assert run.returncode == 1, run.stderr
    assert last_line(run.stderr) == (
        "error: reward function my_rewards.even_tokens raised ValueError('eval boom') in the evaluation at step 2; "
        "checkpoint of step 2 written to out/checkpoint-2; fix my_rewards.even_tokens and resume with "
        "resume_from_checkpoint=true")
    assert "Traceback" not in run.stderr
    (tmp_path / "my_rewards.py").write_text(FIXED.replace("**kwargs", "topic, **kwargs"))
    resumed = train(tmp_path, cfg, "resume_from_checkpoint=true")
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s > 2] == [3, 4, 4]  # steps 3 and 4, then the final evaluation
    # raising in the evaluation before the first step: nothing to resume, and the progress bar is closed first
    (tmp_path / "my_rewards.py").write_text(RAISES_ON_EVAL_PROMPTS.replace('CALLS["train"] >= 2', "True"))
    run = train(tmp_path, cfg, "output_dir=out0")
    assert run.returncode == 1, run.stderr
    assert last_line(run.stderr) == (
        "error: reward function my_rewards.even_tokens raised ValueError('eval boom') in the evaluation at step 0; "
        "no step had completed, nothing to resume")
