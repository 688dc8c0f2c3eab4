"""One folder per method, each with its config, trainer, loss / data pieces and job function.

- `patch`: patch-level pre-training (`PatchTrainingArguments`, `PatchTrainer`, `patch_level_loss`, `run_pretrain`).
- `msn`: Make-Some-Noise fine-tuning (`NoisySFTConfig`, `NoisySFTTrainer`, `MSNNoiseCollator`, `run_sft`).
- `ode`: ODE-shared models started from a dense Llama (`ode_shared_from_llama`).
- `cascade`: cascade-aware training and deferral curves (`CascadeAwareTrainingArguments`, `CascadeAwareTrainer`,
  `cascade_aware_loss`, `run_cascade_train`, `run_cascade_eval`).

The models and decoding loops that ship inside checkpoints live in `hf_effitrain.hub` (flat, as the Hub's
remote-code loader requires); adding a method means adding one folder here plus its flat files there.
"""
