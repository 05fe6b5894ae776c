"""The ``hf`` extra: moe_parallel.hf reads and writes Hugging Face checkpoints with transformers and
safetensors, which the layer itself does not need. Imported first by the package, so that a missing
package fails here, naming the install command, rather than later inside a loader."""

import importlib.util

REQUIRED = ("transformers", "safetensors")
MISSING = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
if MISSING:
    raise ImportError(
        f"moe_parallel.hf needs the Hugging Face packages (missing: {', '.join(MISSING)}): "
        "pip install 'moe_parallel[hf]'"
    )
