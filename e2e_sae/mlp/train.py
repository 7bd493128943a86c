"""Train the MLP, then SAEs on its hidden layers (locally or end-to-end), and evaluate them.

A local SAE reads the clean activation and is trained on MSE to it; an e2e SAE is spliced in
and trained on KL(P_clean || P_with_SAEs) of the class distribution, as in the LM setting, in the
same optimizer step (`e2e_sae.training.engine`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor
from tqdm.auto import tqdm

from e2e_sae.config import config_to_yaml_dict, load_config
from e2e_sae.errors import ConfigError, UserError
from e2e_sae.lm.load import default_device
from e2e_sae.mlp.config import MLPConfig, MLPSAERunConfig, MLPTrainConfig
from e2e_sae.mlp.data import Split, load_split
from e2e_sae.mlp.model import MLP, MLP_FILE
from e2e_sae.objective.losses import LossInputs, build_loss_terms, kl_clean_to_new
from e2e_sae.runs.checkpoint import atomic_save_tensors
from e2e_sae.saes import SAEActs, SAEBase, SAEDict, build_sae, sae_key
from e2e_sae.training.engine import Engine, TrainState, make_optimizer
from e2e_sae.training.guard import NumericalError
from e2e_sae.training.runlog import init_wandb, log_feature_frequencies

logger = logging.getLogger(__name__)

LogFn = Callable[[dict[str, Any]], None]


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[Tensor]:
    return list(torch.randperm(n, generator=gen).split(batch_size))


def accuracy(logits: Tensor, y: Tensor) -> float:
    """Fraction of rows whose arg-max class is `y`."""
    return float((logits.argmax(-1) == y).float().mean())


# --- the MLP --------------------------------------------------------------------------------------
def train_mlp(
    mlp: MLP,
    train: Split,
    cfg: MLPTrainConfig,
    seed: int = 0,
    progress: bool = False,
    log: LogFn | None = None,
) -> list[float]:
    """Adam on cross-entropy; returns the mean training loss of each epoch."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(mlp.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses = []
    mlp.train()
    for epoch in tqdm(range(cfg.n_epochs), desc="mlp", disable=not progress, leave=False):
        total = 0.0
        for idx in _batches(len(train), cfg.batch_size, gen):
            idx = idx.to(train.x.device)
            logits, _, _ = mlp(train.x[idx])
            loss = F.cross_entropy(logits, train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(train))
        if log is not None:
            log({"mlp/train_loss": losses[-1], "mlp/epoch": epoch + 1})
    mlp.eval()
    return losses


# --- SAEs on its hidden layers --------------------------------------------------------------------
def build_mlp_saes(mlp: MLP, run: MLPSAERunConfig) -> dict[str, SAEBase]:
    """One SAE per position of `run` (d_sae = width * dict_size_to_input_ratio)."""
    saes: dict[str, SAEBase] = {}
    kwargs = dict(run.architecture_kwargs)
    if run.k is not None:
        kwargs["k"] = run.k
    for pos in run.sae_positions:
        if pos not in mlp.positions:
            raise ConfigError(
                f"saes[{run.name}].sae_positions: '{pos}' is not a hidden layer ({mlp.positions})"
            )
        width = mlp.width(pos)
        saes[pos] = build_sae(
            run.architecture, width, int(width * run.dict_size_to_input_ratio), **kwargs
        ).to(next(mlp.parameters()).device)
    return saes


def _check_losses(mlp: MLP, run: MLPSAERunConfig) -> list[str]:
    hooks: list[str] = []
    if run.loss.in_to_orig is not None:
        hooks = list(run.loss.in_to_orig.hook_positions)
        bad = [h for h in hooks if h not in mlp.positions]
        if bad:
            raise ConfigError(
                f"saes[{run.name}].loss.in_to_orig.hook_positions: '{bad[0]}' is not a hidden "
                f"layer ({mlp.positions})"
            )
    return hooks


def sae_step_inputs(mlp: MLP, saes: Mapping[str, SAEBase], x: Tensor, e2e: bool) -> LossInputs:
    """One batch through the clean MLP and (e2e) the SAE-spliced one, as loss inputs."""
    with torch.no_grad():
        orig_logits, orig_acts, _ = mlp(x)
    if e2e:
        new_logits, new_acts, sae_acts = mlp(x, saes)
    else:
        new_logits, new_acts = None, {}
        sae_acts = {}
        for pos, sae in saes.items():
            out, c = sae(orig_acts[pos])
            sae_acts[pos] = SAEActs(orig_acts[pos], c, out)
    return LossInputs(
        sae_acts=sae_acts,
        orig_acts=orig_acts,
        new_acts=new_acts,
        orig_logits=orig_logits,
        new_logits=new_logits,
        saes=dict(saes),
    )


def train_mlp_saes(
    mlp: MLP,
    saes: Mapping[str, SAEBase],
    run: MLPSAERunConfig,
    train: Split,
    seed: int = 0,
    progress: bool = False,
    log: LogFn | None = None,
) -> list[dict[str, float]]:
    """Train `saes` with the run's loss terms (the MLP stays frozen) in the engine's optimizer
    step (`e2e_sae.training.engine`, as SAEs on an LM); returns the per-epoch means of the logged
    values (weighted by the examples of each step)."""
    hooks = _check_losses(mlp, run)
    mlp.eval().requires_grad_(False)
    e2e = run.loss.needs_clean_run_past_saes
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(train) / run.batch_size) // run.grad_accum_steps
    modules = SAEDict({sae_key(p): sae for p, sae in saes.items()})
    optimizer, scheduler = make_optimizer(run, modules, steps_per_epoch * run.n_epochs)
    engine = Engine(
        run,
        modules,
        list(saes),
        build_loss_terms(run.loss, hooks),
        optimizer,
        scheduler,
        train.x.device,
        feed=lambda idx: sae_step_inputs(mlp, saes, train.x[idx], e2e),
    )
    state = TrainState()
    history: list[dict[str, float]] = []
    accum = run.grad_accum_steps
    for epoch in tqdm(range(run.n_epochs), desc=run.name, disable=not progress, leave=False):
        idxs = [idx.to(train.x.device) for idx in _batches(len(train), run.batch_size, gen)]
        sums: dict[str, float] = {}
        n_seen = 0
        for i in range(steps_per_epoch):
            micro = idxs[i * accum : (i + 1) * accum]
            try:
                values = engine.train_step(iter(micro), state).read()
            except NumericalError as err:
                raise UserError(f"saes[{run.name}]: {err} (epoch {epoch + 1})") from None
            n = sum(len(idx) for idx in micro)
            n_seen += n
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v * n
        history.append({k: v / n_seen for k, v in sums.items()})
        if log is not None:
            log(
                {f"{run.name}/{k}": v for k, v in history[-1].items()}
                | {f"{run.name}/epoch": epoch + 1}
            )
    for sae in saes.values():
        sae.eval()
    return history


# --- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_mlp(
    mlp: MLP, split: Split, saes: Mapping[str, SAEBase] | None = None
) -> dict[str, Any]:
    """Test metrics of the clean MLP and, with `saes`, of the MLP with all of them spliced in.

    accuracy, ce (nats); with SAEs also accuracy_with_saes, accuracy_drop (percentage points),
    kl = KL(P_clean || P_with_SAEs) per example, and per position: l0, mse, explained_variance
    (1 - SSE / total variance of the SAE's input), alive (latents firing on some test example)
    and feature_frequency ([d_sae] fraction of examples each latent fired on).
    """
    mlp.eval()
    logits, _, _ = mlp(split.x)
    out: dict[str, Any] = {
        "accuracy": accuracy(logits, split.y),
        "ce": float(F.cross_entropy(logits, split.y)),
    }
    if not saes:
        return out
    for sae in saes.values():
        sae.eval()
    new_logits, _, sae_acts = mlp(split.x, saes)
    out["accuracy_with_saes"] = accuracy(new_logits, split.y)
    out["accuracy_drop"] = 100 * (out["accuracy"] - out["accuracy_with_saes"])
    out["ce_with_saes"] = float(F.cross_entropy(new_logits, split.y))
    out["kl"] = float(kl_clean_to_new(logits, new_logits))
    per: dict[str, dict[str, Any]] = {}
    for pos, acts in sae_acts.items():
        fired = (acts.c != 0).float()
        sse = float(((acts.output - acts.input) ** 2).sum())
        var = float(((acts.input - acts.input.mean(0)) ** 2).sum())
        per[pos] = {
            "l0": float(fired.sum(-1).mean()),
            "mse": float(F.mse_loss(acts.output, acts.input)),
            "explained_variance": 1 - sse / var if var > 0 else float("nan"),
            "alive": int((fired.sum(0) > 0).sum()),
            "d_sae": int(acts.c.shape[-1]),
            "feature_frequency": fired.mean(0).cpu(),
        }
    out["per_sae"] = per
    return out


# --- the whole job --------------------------------------------------------------------------------
@dataclass
class MLPJobResult:
    """What `run_mlp_job` produced: test metrics of the MLP and of each SAE run."""

    mlp_metrics: dict[str, Any]
    sae_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    mlp: MLP | None = None
    saes: dict[str, dict[str, SAEBase]] = field(default_factory=dict)
    run_dir: Path | None = None

    def to_json(self) -> dict[str, Any]:
        def clean(d: dict[str, Any]) -> dict[str, Any]:
            return {
                k: clean(v) if isinstance(v, dict) else v
                for k, v in d.items()
                if not isinstance(v, Tensor)
            }

        return {
            "mlp": clean(self.mlp_metrics),
            "saes": {k: clean(v) for k, v in self.sae_metrics.items()},
        }


def save_saes(saes: Mapping[str, SAEBase], path: Path, run: MLPSAERunConfig) -> Path:
    """SAE weights as safetensors, keyed `hidden-<i>.<param>` like LM checkpoints."""

    tensors = {f"{sae_key(p)}.{k}": v for p, s in saes.items() for k, v in s.state_dict().items()}
    meta = {"architecture": run.architecture, "sae_positions": json.dumps(list(saes))}
    atomic_save_tensors(tensors, path, meta)
    return path


def _run_dir(config: MLPConfig) -> Path | None:
    if config.save_dir is None:
        return None
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = config.run_name or f"mlp_{config.dataset}_{stamp}"
    return Path(config.save_dir) / name


def run_mlp_job(
    config: MLPConfig, device: str | None = None, progress: bool = True
) -> MLPJobResult:
    """Train (or load) the MLP, then each SAE run of `config`; evaluate all on the test split.

    Writes, under save_dir/run_name: config.yaml, mlp.safetensors, sae_<name>.safetensors and
    results.json. Logs to W&B when `wandb_project` is set.
    """
    # Matrices here are tiny: extra intra-op threads only add synchronisation (50x slower steps
    # measured on 2 busy cores), so the job runs single-threaded and restores the setting after.
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_mlp_job(config, device, progress)
    finally:
        torch.set_num_threads(n_threads)


def _run_mlp_job(config: MLPConfig, device: str | None, progress: bool) -> MLPJobResult:

    device = device or config.device or default_device()
    torch.manual_seed(config.seed)
    train, test = load_split(config.dataset, config.seed, config.test_fraction, config.data_dir)
    train, test = train.to(device), test.to(device)
    n_classes = int(max(train.y.max(), test.y.max())) + 1
    if config.saved_mlp_path is not None:
        mlp = MLP.load(config.saved_mlp_path, device=device)
        if (mlp.input_size, mlp.output_size) != (train.x.shape[1], n_classes):
            raise ConfigError(
                f"saved_mlp_path: the MLP maps {mlp.input_size} -> {mlp.output_size}, the "
                f"{config.dataset} data needs {train.x.shape[1]} -> {n_classes}"
            )
    else:
        mlp = MLP(train.x.shape[1], config.mlp.hidden_sizes, n_classes).to(device)
    for run in config.saes:  # fail on a bad position before any training
        build_mlp_saes(mlp, run)
        _check_losses(mlp, run)

    run_dir = _run_dir(config)
    wandb_run = None
    step = [0]
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(config_to_yaml_dict(config), sort_keys=False)
        (run_dir / "config.yaml").write_text(text)
    if config.wandb_project:
        wandb_run = init_wandb(config, run_dir or Path.cwd())

    def log(record: dict[str, Any]) -> None:
        if wandb_run is not None:
            step[0] += 1
            wandb_run.log(record, step=step[0])

    if config.saved_mlp_path is None:
        train_mlp(mlp, train, config.mlp, config.seed, progress, log)
    mlp.requires_grad_(False)
    result = MLPJobResult(evaluate_mlp(mlp, test), mlp=mlp, run_dir=run_dir)
    log({"mlp/test_accuracy": result.mlp_metrics["accuracy"]})
    if run_dir is not None:
        mlp.save(run_dir / MLP_FILE)
    for i, run in enumerate(config.saes):
        torch.manual_seed(config.seed + 1 + i)
        saes = build_mlp_saes(mlp, run)
        train_mlp_saes(mlp, saes, run, train, config.seed + 1 + i, progress, log)
        metrics = evaluate_mlp(mlp, test, saes)
        result.saes[run.name] = saes
        result.sae_metrics[run.name] = metrics
        if wandb_run is not None:
            flat = {f"{run.name}/test_{k}": v for k, v in metrics.items() if isinstance(v, float)}
            log(flat)
            freqs = {p: m["feature_frequency"] for p, m in metrics["per_sae"].items()}
            log_feature_frequencies(wandb_run, freqs, step[0], prefix=run.name)
        if run_dir is not None:
            save_saes(saes, run_dir / f"sae_{run.name}.safetensors", run)
    if run_dir is not None:
        text = json.dumps(result.to_json(), indent=2)
        (run_dir / "results.json").write_text(text + "\n")
    if wandb_run is not None:
        if run_dir is not None:
            for p in sorted(run_dir.glob("*.safetensors")) + [run_dir / "results.json"]:
                wandb_run.save(str(p), base_path=str(run_dir), policy="now")
        wandb_run.finish()
    return result


def results_table(result: MLPJobResult) -> str:
    """A plain-text table: the MLP's test accuracy, then one row per SAE (run, position)."""
    m = result.mlp_metrics
    lines = [f"MLP test accuracy: {100 * m['accuracy']:.2f}%  (CE {m['ce']:.4f})"]
    if not result.sae_metrics:
        return lines[0]
    head = ("run", "position", "L0", "alive", "expl.var", "MSE", "acc w/ SAEs", "Δacc (pts)", "KL")
    rows: list[tuple[str, ...]] = [head]
    for name, r in result.sae_metrics.items():
        for pos, s in r["per_sae"].items():
            rows.append(
                (
                    name,
                    pos,
                    f"{s['l0']:.2f}",
                    f"{s['alive']}/{s['d_sae']}",
                    f"{s['explained_variance']:.3f}",
                    f"{s['mse']:.4g}",
                    f"{100 * r['accuracy_with_saes']:.2f}%",
                    f"{-r['accuracy_drop']:+.2f}",
                    f"{r['kl']:.4f}",
                )
            )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines.append(fmt.format(*rows[0]))
    lines.append("  ".join("-" * w for w in widths))
    lines += [fmt.format(*row) for row in rows[1:]]
    return "\n".join(lines)


def load_mlp_config(path: str | Path) -> MLPConfig:

    config = load_config(path, MLPConfig)
    assert isinstance(config, MLPConfig)
    return config


__all__ = [
    "MLPJobResult",
    "accuracy",
    "build_mlp_saes",
    "evaluate_mlp",
    "load_mlp_config",
    "results_table",
    "run_mlp_job",
    "train_mlp",
    "train_mlp_saes",
]
