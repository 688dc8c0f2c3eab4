"""`PatchTrainer` under DDP (2 CPU processes, gloo), launched like `accelerate launch` / `torchrun` would."""

import json
import subprocess
import sys
import textwrap

import pytest

from tests.testing_utils import repo_root

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    from datasets import Dataset
    from hf_effitrain import PatchTrainer, PatchTrainingArguments
    from tests.testing_utils import tiny_model

    out = sys.argv[1]
    ids = torch.randint(0, 128, (64, 8), generator=torch.Generator().manual_seed(0))
    batching = sys.argv[2]
    args = PatchTrainingArguments(
        output_dir=out, patch_size=4, patch_fraction=2 / 3, max_steps=24 if batching == "equal_positions" else 12,
        per_device_train_batch_size=2 if batching == "equal_positions" else 4, patch_batching=batching,
        learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True, ddp_backend="gloo", seed=0,
        disable_tqdm=True, logging_steps=1,
    )
    trainer = PatchTrainer(model=tiny_model("llama").train(), args=args, train_dataset=Dataset.from_dict({"input_ids": ids.tolist()}))
    trainer.train()
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if dist.get_rank() == 0:
        s = trainer.patch_schedule
        logs = [r for r in trainer.state.log_history if "loss" in r]
        json.dump({"world": dist.get_world_size(), "global_batch": s.global_batch, "steps": trainer.state.global_step,
                   "patch_steps": s.patch_steps, "stages": [r["patch_stage"] for r in logs],
                   "tokens": [r["train_tokens"] for r in logs], "in_sync": all(torch.equal(g, gathered[0]) for g in gathered)},
                  open(out + "/ddp.json", "w"))
    dist.barrier()
    dist.destroy_process_group()  # a live gloo group at interpreter exit can abort the process (exit code -6)
    """
)


@pytest.mark.parametrize(
    "batching, global_batch, steps, patch_steps",
    # equal tokens: 4 per device x 2 processes, 12 steps = 8 patch steps (1 sequence of K*T per device) + 4 token steps
    # equal positions: 2 per device x 2 processes, budget 24 token-level steps = 4 patch steps + 8 token steps
    # (the second shares the code path of the first: slow, to keep the suite short)
    [("equal_tokens", 8, 12, 8), pytest.param("equal_positions", 4, 12, 4, marks=pytest.mark.slow)],
)
def test_ddp_two_processes_switch_stage_in_sync(tmp_path, batching, global_batch, steps, patch_steps):
    script = tmp_path / "ddp_patch.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tmp_path), batching]
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo_root()), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(cmd, cwd=repo_root(), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "ddp.json").read_text())
    assert result["world"] == 2 and result["global_batch"] == global_batch
    assert result["steps"] == steps and result["patch_steps"] == patch_steps
    assert result["stages"] == [1.0] * patch_steps + [0.0] * (steps - patch_steps)
    assert result["tokens"][-1] == 24 * 4 * 8  # the same 768-token budget either way
    if batching == "equal_tokens":
        assert result["tokens"] == [64.0 * (i + 1) for i in range(12)]  # 8 blocks of 8 tokens in every step
    assert result["in_sync"]
