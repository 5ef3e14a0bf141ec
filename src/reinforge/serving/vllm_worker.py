"""vLLM worker extension: load full weights from a safetensors file (reinforge's full-weight sync, no NCCL).

This file runs inside the vLLM server's own environment, so it imports only torch and safetensors (never
reinforge). `reinforge vllm-serve` copies it next to nothing else onto the server's PYTHONPATH as the module
`reinforge_vllm_worker` and passes `--worker-extension-cls reinforge_vllm_worker.ReinforgeWorkerExtension`;
the trainer then calls `POST /collective_rpc {"method": "reinforge_load_weights", "args": [path]}`.
"""


class ReinforgeWorkerExtension:
    """Mixed into every vLLM worker (`--worker-extension-cls`)."""

    def reinforge_load_weights(self, path: str) -> int:
        """Load the Hugging Face-named tensors of the safetensors file `path` into the served model, in place.

        vLLM's `reload_weights` maps checkpoint names onto its layers (fused qkv/gate-up projections, tied
        embeddings) and redoes the processing that followed the first load (the CPU backend repacks linear
        weights for its GEMM kernels, leaving the original parameters empty, so a plain `load_weights` cannot
        be used a second time). A tied LM head receives no tensor of its own, so its processed copy (the CPU
        backend's packed GEMM weight) is rebuilt from the reloaded embedding here. Returns the tensor count."""
        from safetensors.torch import load_file

        weights = load_file(path)
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))
        model = self.model_runner.get_model()
        head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
        method = getattr(head, "quant_method", None)
        if head is not None and embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", 0) \
                and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(head)
        return len(weights)
