"""The paper's analyses (issue 23): dictionary geometry across runs, activation analysis and
resample ablation (each against a direct computation on small data), `paper-figures`, and the
paper's SAEs by name (files in the Hugging Face repo's and SAELens' layouts, served by a
monkeypatched download function)."""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import TINY_TLENS, assert_close_scaled, hooked_state, make_config_dict
from matplotlib.figure import Figure
from safetensors.torch import save_file

from e2e_sae.analysis import activations as act
from e2e_sae.analysis import geometry as geo
from e2e_sae.analysis.plots import RunInfo, load_runs, run_labels
from e2e_sae.cli import main
from e2e_sae.config import Config, load_config
from e2e_sae.interop import pretrained as pre
from e2e_sae.lm.load import build_random_model
from e2e_sae.lm.splice import SAETransformer
from e2e_sae.lm.tl import HookedTransformer
from e2e_sae.training.trainer import train

POS = "blocks.1.hook_resid_pre"
KEY = "blocks-1-hook_resid_pre"
LOCAL = {"sparsity": {"coeff": 0.1}, "out_to_in": {"coeff": 1.0}}
E2E = {"sparsity": {"coeff": 0.1}, "logits_kl": {"coeff": 1.0}}
DS = {**E2E, "in_to_orig": {"hook_positions": ["blocks.2.hook_resid_pre"], "total_coeff": 1}}


def kl_direct(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """mean over tokens of sum_v P(v) (log P(v) - log Q(v)), in float64, token by token."""
    p = p_logits.reshape(-1, p_logits.shape[-1]).double()
    q = q_logits.reshape(-1, q_logits.shape[-1]).double()
    total = 0.0
    for t in range(p.shape[0]):
        lp, lq = torch.log_softmax(p[t], -1), torch.log_softmax(q[t], -1)
        total += float((lp.exp() * (lp - lq)).sum())
    return total / p.shape[0]


def check_layout(fig: Figure) -> None:
    """Every panel is a readable size, has axis labels, and a one-line title."""
    fig.canvas.draw()
    w, h = fig.get_size_inches()
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        box = ax.get_position()
        assert box.width * w > 1.5 and box.height * h > 1.2, ax.get_title()
        assert ax.get_xlabel() and ax.get_title(), ax.get_title()
        assert "\n" not in ax.get_title()


# --- dictionary geometry on synthetic checkpoints ------------------------------------------------
def _fake_run(
    root: Path, name: str, loss: dict, seed: int, dec: torch.Tensor, freq: torch.Tensor, l0: float
) -> RunInfo:
    run = root / name
    run.mkdir(parents=True)
    save_file({f"{KEY}.decoder.weight": dec.contiguous()}, str(run / "samples_8.safetensors"))
    config = load_config(make_config_dict(root / "data.jsonl", root, loss=loss, seed=seed))
    assert isinstance(config, Config)
    ev = {"ce_loss_increase": 0.1, "n_tokens": 64, "per_sae": {POS: {"l0": l0}}}
    return RunInfo(run, config, ev, {POS: freq})


@pytest.fixture
def fake_runs(tmp_path: Path) -> list[RunInfo]:
    g = torch.Generator().manual_seed(0)
    specs = [
        ("loc0", LOCAL, 0, 4.0),
        ("loc1", LOCAL, 1, 4.0),
        ("e2e0", E2E, 0, 3.0),
        ("e2e1", E2E, 1, 3.0),
        ("ds2", DS, 2, 5.0),
    ]
    runs = []
    for name, loss, seed, l0 in specs:
        dec = torch.randn(8, 12, generator=g) * 3  # raw columns: load_dictionary normalises
        freq = (torch.rand(12, generator=g) > 0.3).float()
        freq[:2] = 1.0
        runs.append(_fake_run(tmp_path, name, loss, seed, dec, freq, l0))
    return runs


def test_geometry_comparisons_match_brute_force(fake_runs: list[RunInfo]) -> None:
    comps = geo.geometry_comparisons(fake_runs)
    dicts = {}
    for r in fake_runs:
        _, d = geo.load_dictionary(r.run_dir, POS)
        dicts[r.name] = d[:, r.frequencies[POS] > 0]

    def brute(a: torch.Tensor, b: torch.Tensor, same: bool) -> list[float]:
        return [
            max(float(a[:, i] @ b[:, j]) for j in range(b.shape[1]) if not (same and i == j))
            for i in range(a.shape[1])
        ]

    kinds = {(c.kind, c.a.name, c.b.name) for c in comps}
    # every run with itself; every cross-type pair in the paper's direction; seed pairs
    assert {k for k in kinds if k[0] == "within"} == {("within", n, n) for n in dicts}
    assert {k[1:] for k in kinds if k[0] == "cross-type"} == {
        ("e2e0", "loc0"),
        ("e2e0", "loc1"),
        ("e2e1", "loc0"),
        ("e2e1", "loc1"),
        ("ds2", "loc0"),
        ("ds2", "loc1"),
        ("ds2", "e2e0"),
        ("ds2", "e2e1"),
    }
    assert {k[1:] for k in kinds if k[0] == "cross-seed"} == {("loc0", "loc1"), ("e2e0", "e2e1")}
    for c in comps:
        want = brute(dicts[c.a.name], dicts[c.b.name], c.kind == "within")
        assert c.sims.tolist() == pytest.approx(want, abs=1e-5), (c.kind, c.a.name, c.b.name)
    # pooled cross-type histograms use the pairs with different seeds
    pooled = geo.pooled_cross_type(comps, "e2e", "local", POS)
    assert {(c.a.name, c.b.name) for c in pooled} == {("e2e0", "loc1"), ("e2e1", "loc0")}
    rows = geo.comparison_rows(fake_runs, comps)
    r = next(x for x in rows if x["kind"] == "within" and x["a_dir"] == "loc0")
    want = brute(dicts["loc0"], dicts["loc0"], True)
    assert r["mean"] == pytest.approx(sum(want) / len(want), abs=1e-5)
    assert r["n"] == dicts["loc0"].shape[1]
    md = geo.geometry_markdown(fake_runs, comps)
    assert "| e2e → local | 2 |" in md and "| local across seeds | 1 |" in md


def test_pooled_density_weights_each_comparison_equally() -> None:
    edges = [0.0, 0.5, 1.0]
    a = torch.tensor([0.1, 0.2, 0.3, 0.4])  # all in the first bin
    b = torch.tensor([0.9])  # all in the second
    got = geo.pooled_density([a, b], edges)
    assert got.tolist() == pytest.approx([1.0, 1.0])  # (2 + 0) / 2 and (0 + 2) / 2


def test_geometry_figures_layout_and_labels(fake_runs: list[RunInfo]) -> None:
    comps = geo.geometry_comparisons(fake_runs)
    labels = geo.run_labels(fake_runs)
    assert labels[fake_runs[0].run_dir] == "local relu λ=0.1, seed=0"
    assert labels[fake_runs[4].run_dir] == "e2e+ds relu λ=0.1"
    summary = geo.summary_figure(fake_runs, comps)
    assert summary is not None
    check_layout(summary)
    titles = [ax.get_title() for ax in summary.axes]
    assert titles == [
        "L1 resid_pre: within a dictionary",
        "L1 resid_pre: across SAE types",
        "L1 resid_pre: across seeds",
    ]
    cross = [t.get_text() for t in summary.axes[1].get_legend().get_texts()]
    assert [t.split(":")[0] for t in cross] == ["e2e → local", "e2e+ds → local", "e2e+ds → e2e"]
    assert cross[0].endswith("(2 pairs)")  # the different-seed pairs of 4
    for fig in (geo.within_figure(fake_runs, comps), geo.pairs_figure(fake_runs, comps)):
        assert fig is not None
        check_layout(fig)
    pairs = geo.pairs_figure(fake_runs, comps)
    assert pairs is not None
    cells = [t.get_text() for t in pairs.axes[0].texts]
    assert (
        len(cells) == 25 and sum(c.endswith("*") for c in cells) == 4
    )  # loc0-e2e0, loc1-e2e1, both ways


# --- activation analysis: formulas ---------------------------------------------------------------
def test_norms_and_cosine_per_position_match_a_loop() -> None:
    g = torch.Generator().manual_seed(3)
    x, h = torch.randn(4, 5, 6, generator=g), torch.randn(4, 5, 6, generator=g)
    got = act.norms_by_position(x, h)
    for t in range(5):
        nx = [float(x[b, t].norm()) for b in range(4)]
        nh = [float(h[b, t].norm()) for b in range(4)]
        cos = [float(F.cosine_similarity(x[b, t], h[b, t], dim=0)) for b in range(4)]
        assert got["input_norm"][t] == pytest.approx(sum(nx) / 4, rel=1e-5)
        assert got["output_norm"][t] == pytest.approx(sum(nh) / 4, rel=1e-5)
        assert got["norm_ratio"][t] == pytest.approx(
            sum(a / b for a, b in zip(nh, nx, strict=True)) / 4, rel=1e-5
        )
        assert got["cosine"][t] == pytest.approx(sum(cos) / 4, abs=1e-5)
    assert act.first_and_rest([2.0, 1.0, 3.0]) == (2.0, 2.0)


def test_principal_directions_and_their_reconstruction_match_direct_computation() -> None:
    g = torch.Generator().manual_seed(4)
    basis = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0]
    scales = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    x = (torch.randn(400, 6, generator=g, dtype=torch.float64) * scales) @ basis.T + 2.0
    dirs, share = act.principal_directions(x.float().reshape(20, 20, 6), 3)
    centred = (x - x.mean(0)).numpy()
    import numpy as np

    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    for k in range(3):
        assert abs(float(dirs[k].double() @ torch.from_numpy(vt[k]))) == pytest.approx(1, abs=1e-4)
        assert float(dirs[k].norm()) == pytest.approx(1, abs=1e-5)
    assert share.tolist() == pytest.approx((s[:3] ** 2 / (s**2).sum()).tolist(), rel=1e-4)
    # an output that keeps direction 0, halves direction 1 and drops direction 2
    d = dirs.double()
    xc = x - x.mean(0)
    h = x.mean(0) + (xc @ d[0])[:, None] * d[0] + 0.5 * (xc @ d[1])[:, None] * d[1]
    got = act.direction_reconstruction(x.float(), h.float(), dirs)
    for k in range(3):
        px, ph = x @ d[k], h @ d[k]
        var = float(((px - px.mean()) ** 2).sum())
        assert got["explained"][k] == pytest.approx(
            1 - float(((px - ph) ** 2).sum()) / var, abs=1e-4
        )
        assert got["kept"][k] == pytest.approx(float(((ph - ph.mean()) ** 2).sum()) / var, abs=1e-4)
    assert got["explained"][:3] == pytest.approx([1.0, 0.75, 0.0], abs=1e-3)
    assert got["kept"][:3] == pytest.approx([1.0, 0.25, 0.0], abs=1e-3)


def test_resample_permutation_and_direction_swap() -> None:
    perm = act.resample_permutation(3, 4, seed=1)
    assert sorted(perm.tolist()) == list(range(12))
    assert all(perm[i] == i for i in range(0, 12, 4))  # position 0 of each window stays
    assert any(perm[i] != i for i in range(12))
    everything = act.resample_permutation(3, 4, seed=1, shuffle_first=True)
    assert sorted(everything.tolist()) == list(range(12))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 5, generator=g)
    u = F.normalize(torch.randn(5, generator=g), dim=0)
    got = act.resample_direction(x, u, perm).reshape(12, 5)
    flat = x.reshape(12, 5)
    for t in range(12):
        want = flat[t] - float(flat[t] @ u) * u + float(flat[perm[t]] @ u) * u
        assert_close_scaled(got[t], want, 1e-5)


# --- resample-ablation KL against a direct computation --------------------------------------------
@pytest.fixture
def tiny_model(token_data: Path, tmp_path: Path) -> SAETransformer:
    cfg = load_config(make_config_dict(token_data, tmp_path, loss=E2E))
    assert isinstance(cfg, Config)
    torch.manual_seed(0)
    return SAETransformer.from_config(cfg, device="cpu")


@pytest.mark.parametrize("spliced", [False, True])
def test_resample_ablation_kl_matches_direct_computation(
    tiny_model: SAETransformer, spliced: bool
) -> None:
    g = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, 97, (3, 16), generator=g)
    dirs = torch.linalg.qr(torch.randn(32, 2, generator=g))[0].T.contiguous()  # [2, 32]
    perm = torch.randperm(48, generator=g)
    got = act.resample_ablation_kl(tiny_model, [tokens], POS, dirs, spliced=spliced, perm=perm)
    lm: HookedTransformer = tiny_model.tlens_model  # type: ignore[assignment]
    sae = tiny_model.sae(POS)

    def swap(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:  # token by token
        flat = x.reshape(-1, x.shape[-1])
        rows = [flat[t] + (float(flat[perm[t]] @ u) - float(flat[t] @ u)) * u for t in range(48)]
        return torch.stack(rows).reshape(x.shape)

    def logits(edit) -> torch.Tensor:  # noqa: ANN001
        def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
            y = edit(x)
            return sae(y)[0] if spliced else y

        with torch.no_grad():
            return lm.run_with_hooks(tokens, fwd_hooks=[(POS, hook)])

    ref = logits(lambda x: x)
    for k in range(2):
        want = kl_direct(ref, logits(lambda x, k=k: swap(x, dirs[k])))
        assert want > 1e-6  # the ablation changes the output
        assert got[k] == pytest.approx(want, rel=1e-4, abs=1e-9)


# --- on trained runs: the commands ----------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(token_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("paper_runs")
    specs = {"local0": (LOCAL, 0), "local1": (LOCAL, 1), "e2e1": (E2E, 1), "ds0": (DS, 0)}
    out = []
    for name, (loss, seed) in specs.items():
        cfg = load_config(make_config_dict(token_data, root, loss=loss, seed=seed))
        assert isinstance(cfg, Config)
        out.append(train(cfg, root / name, progress=False))
    return out


def test_activation_analysis_of_runs_matches_its_parts(runs: list[Path]) -> None:
    infos = load_runs(runs)
    report = act.activation_analysis(infos, n_tokens=64, n_directions=3, batch_size=2)
    assert report.n_tokens == 64 and len(report.runs) == 4
    assert [r.run.name for r in report.runs] == ["local0", "local1", "e2e1", "ds0"]
    # the clean model's KL per direction, recomputed from the run's own model and tokens
    model = SAETransformer.from_local_path(runs[0])
    from e2e_sae.data import create_data_loader
    from e2e_sae.eval.evaluate import eval_dataset

    cfg = infos[0].config
    it = create_data_loader(eval_dataset(cfg), 2, cfg.seed + 42)
    batches = [next(it) for _ in range(2)]
    x, h = act.collect_activations(model, batches, POS)
    dirs, share = act.principal_directions(x, 3)
    assert report.variance_share[POS] == pytest.approx(share.tolist(), rel=1e-4)
    want = act.direction_reconstruction(x, h, dirs)
    for key in ("explained", "kept"):
        assert report.runs[0].directions[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6)
    perm = act.resample_permutation(2, 16, seed=0)
    clean = act.resample_ablation_kl(model, batches, POS, dirs, spliced=False, perm=perm)
    assert report.clean_kl[POS] == pytest.approx(clean, rel=1e-4, abs=1e-9)
    for fig in (
        act.norms_figure(report),
        act.norm_scatter_figure(report),
        act.directions_figure(report),
        act.resample_figure(report),
    ):
        check_layout(fig)


def test_paper_figures_writes_every_file_and_an_index(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "figures"
    rc = main(
        [
            "paper-figures",
            *map(str, runs),
            "--out",
            str(out),
            "--n-tokens",
            "64",
            "--directions",
            "3",
        ]
    )
    assert rc == 0
    stems = [
        "pareto_l0_ce_increase",
        "alive_vs_ce_increase",
        "feature_density",
        "downstream_reconstruction",
        "dictionary_geometry",
        "geometry_within_dictionary",
        "geometry_all_pairs",
        *(["geometry_umap_blocks_1_hook_resid_pre"] if find_spec("umap") else []),
        "activation_norms_by_position",
        "activation_norm_scatter",
        "principal_directions_reconstructed",
        "resample_ablation_kl",
    ]
    for stem in stems:
        assert (out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG", stem
        assert "<svg" in (out / f"{stem}.svg").read_text()[:2000], stem
    for table in ("runs.md", "matched.md", "geometry.md", "activations.md"):
        assert (out / table).read_text().startswith("# "), table
    index = (out / "index.md").read_text()
    page = (out / "index.html").read_text()
    for stem in stems:
        assert f"({stem}.png)" in index and f'src="{stem}.png"' in page, stem
    for table in ("runs.md", "geometry.md", "activations.md"):
        assert f"[{table}]({table})" in index
    # one short label per run, the same in runs.md and in the figures (plots.run_labels)
    labels = run_labels(load_runs(runs))
    assert labels == [
        "local relu λ=0.1, seed=0",
        "local relu λ=0.1, seed=1",
        "e2e relu λ=0.1",
        "e2e+ds relu λ=0.1",
    ]
    table = (out / "runs.md").read_text()
    within = (out / "geometry_within_dictionary.svg").read_text()
    for label in labels:
        assert f"| {label} |" in table and label in within, label
    acts = json.loads((out / "activations.json").read_text())
    runs_at = acts["positions"][POS]["runs"]
    assert {v["type"] for v in runs_at.values()} == {"local", "e2e", "e2e+ds"}
    assert all(len(v["resample_kl"]) == 3 for v in runs_at.values())
    geometry = json.loads((out / "geometry.json").read_text())
    assert sum(r["kind"] == "cross-type" for r in geometry) == 2 + 2 + 1


def test_geometry_and_activations_commands(runs: list[Path], tmp_path: Path, capsys) -> None:
    assert main(["geometry", *map(str, runs[:2]), "--out", str(tmp_path / "g"), "--no-umap"]) == 0
    printed = capsys.readouterr().out
    assert "local across seeds" in printed and "geometry.md" in printed
    assert not list((tmp_path / "g").glob("geometry_umap_*"))
    args = ["activations", str(runs[2]), "--out", str(tmp_path / "a"), "--n-tokens", "32"]
    assert main([*args, "--directions", "2"]) == 0
    assert "KL dir 1" in capsys.readouterr().out
    assert main(["paper-figures", "--out", str(tmp_path / "x")]) == 2  # no runs: usage error


def test_paper_figures_takes_extra_sections(runs: list[Path], tmp_path: Path) -> None:
    from e2e_sae.analysis.paper import Artifact, PaperContext, paper_figures

    def extra(ctx: PaperContext) -> list[Artifact]:
        p = ctx.out / "extra.md"
        p.write_text(f"{len(ctx.runs)} runs")
        return [Artifact(p, "an extra table")]

    paper_figures(runs[:1], tmp_path / "o", sections=[("Extra", extra)])
    assert "## Extra" in (tmp_path / "o" / "index.md").read_text()
    assert (tmp_path / "o" / "extra.md").read_text() == "1 runs"


# --- the paper's SAEs by name ---------------------------------------------------------------------
def test_paper_sae_names_match_saelens_registry() -> None:
    assert len(pre.PAPER_SAES) == 18
    s = pre.paper_sae("e2e_similar_ce_layer_6")
    assert (s.sae_type, s.matched, s.position) == ("e2e", "CE", "blocks.6.hook_resid_pre")
    assert s.hf_files == ("e2e_similar_ce_layer_6.pt", "e2e_similar_ce_layer_6.yaml")
    assert s.saelens_release == "gpt2-small-res_sce-ajt"
    assert pre.paper_sae("gpt2-small-res_slefr-ajt/blocks.10.hook_resid_pre").name == (
        "downstream_similar_l0_layer_10"
    )
    with pytest.raises(Exception, match="did you mean 'e2e_similar_ce_layer_6'"):
        pre.paper_sae("e2e_similar_ce_layer6")
    sae_lens = pytest.importorskip("sae_lens")
    directory = sae_lens.loading.pretrained_saes_directory.get_pretrained_saes_directory()
    for s in pre.PAPER_SAES.values():
        release = directory[s.saelens_release]
        repo, folder = s.saelens_uri.removeprefix("hf://").rsplit("/", 1)
        assert release.repo_id == repo and release.saes_map[s.position] == folder


LM3 = {"act_fn": "gelu", "d_head": 4, "d_model": 16, "d_vocab": 97, "n_ctx": 16, "n_layers": 3}


def write_original_lm(folder: Path) -> Path:
    """An `epoch_1.pt` LM with the `final_config.yaml` the original's train_tlens writes."""
    folder.mkdir(parents=True)
    torch.manual_seed(7)
    torch.save(hooked_state(LM3), folder / "epoch_1.pt")
    tlens = {**LM3, "dtype": "float32", "tokenizer_name": "gpt2"}
    (folder / "final_config.yaml").write_text(yaml.dump({"tlens_config": tlens, "seed": 0}))
    return folder / "epoch_1.pt"


def write_hf_repo(folder: Path, lm: Path, data: Path, name: str, position: str) -> dict:
    """`<name>.pt` + `<name>.yaml` as the paper's Hugging Face repo holds them: the .pt a
    torch.save of the four tensors under the SAE's own names (decoder = the unit-norm
    dictionary), the .yaml the original's final_config.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(8)
    d_in, d_sae = 16, 32
    state = {
        "encoder.weight": torch.randn(d_sae, d_in, generator=g) * 0.3,
        "encoder.bias": torch.randn(d_sae, generator=g) * 0.1,
        "decoder.weight": F.normalize(torch.randn(d_in, d_sae, generator=g), dim=0),
        "decoder.bias": torch.randn(d_in, generator=g) * 0.1,
    }
    torch.save(state, folder / f"{name}.pt")
    dataset = {
        "dataset_name": str(data),
        "is_tokenized": True,
        "tokenizer_name": "gpt2",
        "streaming": False,
        "split": "train",
        "n_ctx": 16,
        "seed": None,
        "column_name": "input_ids",
    }
    config = {
        "wandb_project": "gpt2",
        "wandb_run_name": None,
        "wandb_run_name_prefix": "",
        "seed": 0,
        "tlens_model_name": None,
        "tlens_model_path": str(lm),
        "save_dir": "/home/someone/e2e_sae/scripts/train_tlens_saes/out",
        "n_samples": 400_000,
        "save_every_n_samples": None,
        "eval_every_n_samples": 40_000,
        "eval_n_samples": 4,
        "batch_size": 4,
        "effective_batch_size": 16,
        "lr": 0.0005,
        "lr_schedule": "cosine",
        "min_lr_factor": 0.1,
        "warmup_samples": 20_000,
        "cooldown_samples": 0,
        "max_grad_norm": 10.0,
        "log_every_n_grad_steps": 20,
        "collect_act_frequency_every_n_samples": 40_000,
        "act_frequency_n_tokens": 500_000,
        "loss": {
            "sparsity": {"coeff": 1.5, "p_norm": 1.0},
            "in_to_orig": None,
            "out_to_orig": None,
            "out_to_in": {"coeff": 0.0},
            "logits_kl": {"coeff": 0.5},
        },
        "train_data": dataset,
        "eval_data": dict(dataset),
        "saes": {
            "dict_size_to_input_ratio": d_sae / d_in,
            "pretrained_sae_paths": None,
            "retrain_saes": False,
            "sae_positions": [position],
            "type_of_sparsifier": "sae",
        },
    }
    (folder / f"{name}.yaml").write_text(yaml.dump(config))
    return state


@pytest.fixture
def hub(tmp_path: Path, token_data: Path, monkeypatch) -> tuple[list[dict], dict]:
    """The paper's repo with one SAE, served by a fake hf_hub_download that records each call."""
    lm = write_original_lm(tmp_path / "lm")
    repo = tmp_path / "hub" / pre.PAPER_HF_REPO
    state = write_hf_repo(repo, lm, token_data, "e2e_similar_ce_layer_2", "blocks.2.hook_resid_pre")
    calls: list[dict] = []

    def fake_download(**kw: Any) -> str:
        calls.append(kw)
        path = tmp_path / "hub" / kw["repo_id"] / kw["filename"]
        if not path.exists():
            raise FileNotFoundError(f"404 Client Error: {kw['filename']}")
        return str(path)

    monkeypatch.setattr(pre, "hf_hub_download", fake_download)
    return calls, state


def test_write_paper_run_downloads_the_pair_and_writes_a_run(hub, tmp_path: Path) -> None:
    calls, state = hub
    out = tmp_path / "paper_run"
    assert main(["pretrained", "e2e_similar_ce_layer_2", "--out", str(out)]) == 0
    assert [(c["repo_id"], c["filename"]) for c in calls] == [
        ("apollo-research/e2e-saes-gpt2", "e2e_similar_ce_layer_2.pt"),
        ("apollo-research/e2e-saes-gpt2", "e2e_similar_ce_layer_2.yaml"),
    ]
    pos, dictionary = geo.load_dictionary(out)
    assert pos == "blocks.2.hook_resid_pre"
    assert_close_scaled(dictionary, state["decoder.weight"], 1e-6)
    # the run loads, and its SAE computes the paper SAE's function: ReLU(x W_e^T + b_e) D + b_d
    model = SAETransformer.from_local_path(out)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(9))
    c = torch.relu(x @ state["encoder.weight"].T + state["encoder.bias"])
    want = c @ state["decoder.weight"].T + state["decoder.bias"]
    assert_close_scaled(model.sae(pos)(x)[0].detach(), want, 1e-5)
    # ... and every analysis runs on it: eval (the run's data), geometry, activations
    assert main(["eval", str(out)]) == 0
    infos = load_runs([out])
    report = act.activation_analysis(infos, n_tokens=32, n_directions=2)
    assert len(report.runs) == 1 and len(report.clean_kl[pos]) == 2
    # load_paper_sae builds the same model without writing a run directory
    direct = pre.load_paper_sae("e2e_similar_ce_layer_2")
    assert direct.run_config is not None and direct.sae_positions == [pos]
    assert_close_scaled(direct.sae(pos)(x)[0].detach(), want, 1e-5)
    assert main(["pretrained", "e2e_similar_ce_layer_2", "--out", str(out)]) == 2  # not empty


def test_paper_sae_download_failure_is_one_line(hub, tmp_path: Path, capsys) -> None:
    assert main(["pretrained", "local_similar_l0_layer_6", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: pretrained: cannot download local_similar_l0_layer_6.pt")
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()
    assert main(["pretrained"]) == 0
    listing = capsys.readouterr().out
    assert "e2e_similar_ce_layer_6" in listing and "gpt2-small-res_scefr-ajt" in listing


def test_paper_sae_from_the_saelens_registry(tmp_path: Path, monkeypatch) -> None:
    """source="saelens": the release's folder in SAELens' layout, fetched through the hub's
    snapshot_download (asked for the registry's repo and folder) and spliced into GPT-2."""
    from e2e_sae.interop import hub as hub_mod

    s = pre.paper_sae("local_similar_ce_layer_2")
    repo, folder = s.saelens_uri.removeprefix("hf://").rsplit("/", 1)
    assert (repo, folder) == ("neuronpedia/gpt2-small__res_scl-ajt", "2-res_scl-ajt")
    root = tmp_path / "snap"
    (root / folder).mkdir(parents=True)
    g = torch.Generator().manual_seed(10)
    d_in, d_sae = 32, 48
    w_dec = F.normalize(torch.randn(d_sae, d_in, generator=g), dim=1)
    tensors = {
        "W_enc": torch.randn(d_in, d_sae, generator=g) * 0.3,
        "b_enc": torch.randn(d_sae, generator=g) * 0.1,
        "W_dec": w_dec,
        "b_dec": torch.randn(d_in, generator=g) * 0.1,
    }
    save_file(tensors, str(root / folder / "sae_weights.safetensors"))
    cfg = {
        "architecture": "standard",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "model_name": "gpt2-small",
        "hook_name": s.position,
        "hook_layer": 2,
        "hook_head_index": None,
        "activation_fn_str": "relu",
        "apply_b_dec_to_input": False,
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": None,
        "prepend_bos": True,
        "dataset_path": "apollo-research/Skylion007-openwebtext-tokenizer-gpt2",
        "context_size": 1024,
        "normalize_activations": "none",
    }
    (root / folder / "cfg.json").write_text(json.dumps(cfg))
    asked: list[dict] = []

    def fake_snapshot(**kw: Any) -> str:
        asked.append(kw)
        return str(root)

    tiny = build_random_model({**TINY_TLENS, "n_layers": 3}).train()
    monkeypatch.setattr(hub_mod, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(pre, "load_pretrained", lambda name, device=None: tiny)
    model = pre.load_paper_sae("local_similar_ce_layer_2", source="saelens")
    assert asked[0]["repo_id"] == repo and asked[0]["allow_patterns"] == [f"{folder}/*"]
    x = torch.randn(4, d_in, generator=g)
    want = torch.relu(x @ tensors["W_enc"] + tensors["b_enc"]) @ w_dec + tensors["b_dec"]
    assert_close_scaled(model.sae(s.position)(x)[0].detach(), want, 1e-5)


def test_umap_is_optional(fake_runs: list[RunInfo], tmp_path: Path, monkeypatch) -> None:
    """Without umap-learn (an extra): asking for the UMAP is a one-line error naming the extra;
    the default leaves it out, and paper-figures says so on its index page."""
    from e2e_sae.analysis.paper import PaperContext, geometry_section
    from e2e_sae.errors import UserError

    monkeypatch.setattr(geo, "umap_available", lambda: False)
    with pytest.raises(UserError, match=r"e2e-sae\[umap\]"):
        geo.write_geometry(fake_runs, tmp_path / "a", umap=True)
    paths = geo.write_geometry(fake_runs, tmp_path / "b")
    assert paths and not any("umap" in p.name for p in paths)
    monkeypatch.setattr("e2e_sae.analysis.paper.umap_available", lambda: False)
    ctx = PaperContext(fake_runs, tmp_path / "c")
    (tmp_path / "c").mkdir()
    geometry_section(ctx)
    assert ctx.notes and "umap-learn" in ctx.notes[0]


def _experiment() -> Any:
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "experiments" / "paper_analyses" / "run.py"
    spec = importlib.util.spec_from_file_location("paper_analyses_run", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_paper_experiment_plans_matched_runs_with_different_seeds() -> None:
    mod = _experiment()
    cfgs = mod.configs(quick=False)
    assert list(cfgs) == ["local_s0", "local_s1", "e2e_s0", "e2e_s1", "e2e_ds_s2"]
    kinds = {
        n: (c.loss.logits_kl is not None, c.loss.in_to_orig is not None) for n, c in cfgs.items()
    }
    assert kinds["local_s0"] == (False, False) and kinds["e2e_s1"] == (True, False)
    assert kinds["e2e_ds_s2"] == (True, True)
    assert {c.saes.sae_positions[0] for c in cfgs.values()} == {mod.POSITION}
    assert len({c.n_samples for c in cfgs.values()}) == 1  # one budget for all
    # autointerp: one run of each type, the local one first (the comparison's baseline)
    assert [kinds[n] for n in mod.AUTOINTERP_RUNS] == [(False, False), (True, False), (True, True)]


@pytest.mark.slow
def test_paper_experiment_quick_mode_end_to_end(tmp_path: Path) -> None:
    mod = _experiment()
    assert mod.main(["--quick", "--out", str(tmp_path)]) == 0
    index = (tmp_path / "results" / "index.md").read_text()
    assert "resample_ablation_kl.png" in index and "geometry_all_pairs.png" in index
    assert "(autointerp_scores.png)" in index  # one feature per run of each type
    cmp = json.loads((tmp_path / "results" / "autointerp_comparison.json").read_text())
    assert [r["run"] for r in cmp["runs"]] == list(mod.AUTOINTERP_RUNS)
    assert json.loads((tmp_path / "results" / "timing.json").read_text())["total_wall_s"] > 0
