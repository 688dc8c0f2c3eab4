"""`PatchTrainer` under DDP (2 CPU processes, gloo), launched like `accelerate launch` / `torchrun` would."""

import json
import subprocess
import sys
import textwrap

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
    args = PatchTrainingArguments(
        output_dir=out, patch_size=4, patch_fraction=2 / 3, max_steps=24, per_device_train_batch_size=2,
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
                   "tokens": logs[-1]["train_tokens"], "in_sync": all(torch.equal(g, gathered[0]) for g in gathered)},
                  open(out + "/ddp.json", "w"))
    dist.barrier()
    dist.destroy_process_group()  # a live gloo group at interpreter exit can abort the process (exit code -6)
    """
)


def test_ddp_two_processes_switch_stage_in_sync(tmp_path):
    script = tmp_path / "ddp_patch.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tmp_path)]
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo_root()), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(cmd, cwd=repo_root(), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "ddp.json").read_text())
    # global batch 2 x 2 processes: budget 24 steps -> 4 patch steps + 8 token steps
    assert result["world"] == 2 and result["global_batch"] == 4
    assert result["steps"] == 12 and result["patch_steps"] == 4
    assert result["stages"] == [1.0] * 4 + [0.0] * 8
    assert result["tokens"] == 24 * 4 * 8
    assert result["in_sync"]
