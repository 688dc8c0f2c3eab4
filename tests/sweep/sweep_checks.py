"""One architecture of the sweep: build a tiny model of a model type and check every feature on it.

`check_type(model_type)` returns `{"model_type", "build", "decode": {"jacobi", "tr_jacobi"}, "export", "patch_loss"}`,
each feature an outcome string:

- `"exact"`: equal to the reference (greedy `generate` token for token; the model's own logits after an export
  round trip; the model's own causal-LM loss at K=1);
- `"refused: <message>"`: the package raised a clear error (a `ValueError` / `TypeError` from its own code);
- `"WRONG: <detail>"`: a silent wrong result (never acceptable);
- `"crash: <error>"`: an error raised elsewhere (inside transformers): not a clear refusal.

`"build"` is `"ok"` or why no tiny model of the type could be built (the type is then not checked).
"""

from __future__ import annotations

import tempfile
import traceback
from typing import Any

import torch
import torch.nn.functional as F
from tiny_configs import tiny_causal_lm

from hf_effitrain import export_pretrained, generate, patch_level_loss

__all__ = ["FEATURES", "check_type", "outcome_kind"]

FEATURES = ("jacobi", "tr_jacobi", "export", "patch_loss")
PROMPT = [[5, 9, 17, 33, 9, 17, 41, 6]]
NEW_TOKENS = 10
# the package's own frames (and the copies transformers makes of an export's remote code)
_OWN_CODE = ("hf_effitrain/", "transformers_modules/")


def outcome_kind(outcome: str) -> str:
    """`exact`, `refused`, `WRONG` or `crash` (or `ok` for a build)."""
    return outcome.split(":", 1)[0]


def _raised(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    own = bool(frames) and any(marker in frames[-1].filename for marker in _OWN_CODE)
    kind = "refused" if own and isinstance(error, (ValueError, TypeError)) else "crash"
    return f"{kind}: {type(error).__name__}: {' '.join(str(error).split())[:400]}"


def _check_decode(model, strategy: str, greedy: torch.Tensor) -> str:
    try:
        out = generate(
            model, torch.tensor(PROMPT), strategy=strategy, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
        )
    except Exception as error:
        return _raised(error)
    if out.shape != greedy.shape or not torch.equal(out, greedy):
        return f"WRONG: {out[0, len(PROMPT[0]) :].tolist()} vs greedy {greedy[0, len(PROMPT[0]) :].tolist()}"
    return "exact"


def _check_export(model) -> str:
    with tempfile.TemporaryDirectory() as folder:
        try:
            export_pretrained(model, folder)  # reloads through the remote class and compares weights, buffers, logits
        except Exception as error:
            return _raised(error)
    return "exact"


def _check_patch_loss(model) -> str:
    """K=1 against the next-token cross-entropy of the model's own logits on `input_ids` (its stock causal-LM loss;
    computed from the logits because a few types' `labels` loss is unshifted: bart, bigbird_pegasus, ...)."""
    ids = torch.tensor([PROMPT[0] * 2])
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        stock = F.cross_entropy(logits[0, :-1], ids[0, 1:])
    except Exception as error:
        return f"crash: the model's own forward fails: {type(error).__name__}: {str(error)[:200]}"
    try:
        with torch.no_grad():
            ours = patch_level_loss(model, ids, 1, use_fused_loss=False)
    except Exception as error:
        return _raised(error)
    if not torch.allclose(ours.float(), stock, rtol=1e-5, atol=1e-5):
        return f"WRONG: {ours.item():.6g} vs the model's own {stock.item():.6g}"
    return "exact"


def check_type(model_type: str) -> dict[str, Any]:
    """Build a tiny `model_type` causal LM (float32, eager attention) and check every feature (see the module doc)."""
    result: dict[str, Any] = {"model_type": model_type}
    try:
        model = tiny_causal_lm(model_type)
        with torch.no_grad():
            greedy = model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    except Exception as error:
        result["build"] = f"no tiny model: {type(error).__name__}: {' '.join(str(error).split())[:300]}"
        return result
    result["build"] = "ok"
    result["class"] = type(model).__name__
    for strategy in ("jacobi", "tr_jacobi"):
        result[strategy] = _check_decode(model, strategy, greedy)
    result["export"] = _check_export(model)
    result["patch_loss"] = _check_patch_loss(model)
    return result
