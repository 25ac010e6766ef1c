"""Which W&B mode a run logs in, decided from the config and the environment (no W&B import).

    mode = resolve_mode(cfg.wandb.mode)     # "online" | "offline" | "disabled"
    problem = mode_problem(cfg.wandb.mode)  # None, or why an online run would log nothing

``wandb.mode=auto`` is online with an API key (``WANDB_API_KEY`` or a netrc entry for
api.wandb.ai) and offline without one; the environment's ``WANDB_MODE`` (e.g. ``disabled``)
wins over the config. An online mode without a key makes ``wandb.init`` fail at start-up: the run
warns and trains on without W&B (:class:`mohico.trainer.wandb_log.WandbLogger`); `mohico train
--dry-run` refuses it (:func:`mode_problem`).
"""
from __future__ import annotations

import netrc
import os

ENV_MODES = ("disabled", "offline", "online", "dryrun")


def resolve_mode(cfg_mode: str) -> str:
    """The mode W&B runs in for config value ``cfg_mode`` (``WANDB_MODE`` wins; ``dryrun`` is offline)."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ENV_MODES:
        return "offline" if env == "dryrun" else env
    if cfg_mode != "auto":
        return cfg_mode
    return "online" if _have_api_key() else "offline"


def _have_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def mode_problem(cfg_mode: str) -> str | None:
    """Why a run of config value ``cfg_mode`` would log nothing to W&B (online without an API key),
    naming the key and the fix; None when it logs as asked."""
    if resolve_mode(cfg_mode) != "online" or _have_api_key():
        return None
    env = os.environ.get("WANDB_MODE", "").strip().lower() in ENV_MODES
    where = "WANDB_MODE=online (environment)" if env else f"wandb.mode={cfg_mode}"
    return (f"'wandb.mode': {where} but no W&B API key (no WANDB_API_KEY, no api.wandb.ai entry in ~/.netrc): "
            f"wandb.init would fail and the run would train without W&B logging. Log in (`wandb login`, or set "
            f"WANDB_API_KEY), or set wandb.mode=offline (sync later with `wandb sync`) or wandb.mode=disabled"
            + (" and unset WANDB_MODE" if env else ""))
