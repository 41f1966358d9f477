"""The checkpoint folder format, shared by the stage that writes it (train) and the one that reads it
(features), so neither imports the other.

  checkpoint-<epoch>/ adapter_model.safetensors + adapter_config.json   (the peft LoRA adapter)
                      optimizer_moments.safetensors   "<parameter name>.exp_avg" / ".exp_avg_sq"
                      checkpoint.json                 {"epoch", "step", "lr_mean", "model", "betas", "eps", ...}
"""

from __future__ import annotations

CHECKPOINT_FILE = "checkpoint.json"
MOMENTS_FILE = "optimizer_moments.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
