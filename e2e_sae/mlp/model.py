"""A small ReLU MLP classifier whose hidden activations SAEs can replace.

Position `hidden.<i>` is the ReLU output of hidden layer i, i.e. what layer i + 1 reads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from e2e_sae.errors import UserError
from e2e_sae.runs.checkpoint import atomic_save_tensors, read_tensors, tensor_metadata
from e2e_sae.saes import SAEActs, SAEBase

MLP_FILE = "mlp.safetensors"


def position_name(i: int) -> str:
    return f"hidden.{i}"


class MLP(nn.Module):
    def __init__(self, input_size: int, hidden_sizes: Sequence[int], output_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_sizes = list(hidden_sizes)
        self.output_size = output_size
        sizes = [input_size, *self.hidden_sizes]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:], strict=False))
        self.out = nn.Linear(sizes[-1], output_size)

    @property
    def positions(self) -> list[str]:
        return [position_name(i) for i in range(len(self.hidden))]

    def width(self, position: str) -> int:
        return self.hidden_sizes[self.positions.index(position)]

    def forward(
        self, x: Tensor, saes: Mapping[str, SAEBase] | None = None
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, SAEActs]]:
        """x [batch, input_size] -> (logits [batch, classes], {position: activation arriving
        there}, {position: SAEActs}) with each SAE in `saes` replacing its position."""
        acts: dict[str, Tensor] = {}
        sae_acts: dict[str, SAEActs] = {}
        h = x
        for i, layer in enumerate(self.hidden):
            h = F.relu(layer(h))
            pos = position_name(i)
            acts[pos] = h
            if saes is not None and pos in saes:
                out, c = saes[pos](h)
                sae_acts[pos] = SAEActs(h, c, out)
                h = out
        return self.out(h), acts, sae_acts

    def save(self, path: Path) -> Path:
        meta = {
            "input_size": self.input_size,
            "hidden_sizes": self.hidden_sizes,
            "output_size": self.output_size,
        }
        atomic_save_tensors(self.state_dict(), path, {"mlp": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> MLP:
        """Load `mlp.safetensors` (or the run folder holding it)."""

        p = Path(path).expanduser()
        if p.is_dir():
            p = p / MLP_FILE
        state = read_tensors(p, "saved_mlp_path")
        raw = tensor_metadata(p).get("mlp")
        if raw is None:
            raise UserError(f"saved_mlp_path: {p} is not an MLP saved by e2e_sae (no metadata)")
        meta = json.loads(raw)
        model = cls(meta["input_size"], meta["hidden_sizes"], meta["output_size"])
        model.load_state_dict(state)
        return model.to(device) if device is not None else model
