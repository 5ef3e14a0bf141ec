"""vLLM worker extension: load full weights from a safetensors file (reinforge's full-weight sync, no NCCL).

This file runs inside the vLLM server's own environment, so it imports only torch and safetensors (never
reinforge). `reinforge vllm-serve` copies it next to nothing else onto the server's PYTHONPATH as the module
`reinforge_vllm_worker` and passes `--worker-extension-cls reinforge_vllm_worker.ReinforgeWorkerExtension`;
the trainer then calls `POST /collective_rpc {"method": "reinforge_load_weights", "args": [path]}`.
"""


class ReinforgeWorkerExtension:
    """Mixed into every vLLM worker (`--worker-extension-cls`)."""

    def reinforge_load_weights(self, path: str) -> int:
        """Load the Hugging Face-named tensors of the safetensors file `path` into the served model (vLLM's own
        `load_weights` maps them: fused qkv/gate-up projections, tied embeddings). Returns the tensor count."""
        from safetensors.torch import load_file

        weights = load_file(path)
        self.model_runner.model.load_weights(weights=weights.items())
        return len(weights)
