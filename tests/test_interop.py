"""SAELens format (both directions), Hugging Face Hub (against a local folder), W&B (offline and a
mocked API) and the SAEBench adapter."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TLENS, make_config_dict
from safetensors.torch import load_file, save_file

from e2e_sae import SAETransformer
from e2e_sae.cli import main
from e2e_sae.config import Config, load_config
from e2e_sae.errors import UserError
from e2e_sae.interop import hub
from e2e_sae.interop.pretrained import load_pretrained_saes
from e2e_sae.interop.saebench import to_saebench
from e2e_sae.interop.saelens import (
    encoder_linear,
    export_run_saelens,
    load_saelens_sae,
    read_saelens_cfg,
    saelens_transformer,
    save_saelens,
)
from e2e_sae.lm.load import build_random_model
from e2e_sae.runs.checkpoint import list_checkpoints
from e2e_sae.saes import SAEBase, build_sae
from e2e_sae.training.trainer import train

HOOK = "blocks.1.hook_resid_pre"
ARCHS = [
    ("relu", {}),
    ("topk", {"k": 5}),
    ("batchtopk", {"k": 5}),
    ("jumprelu", {"init_threshold": 0.2}),
]
# SAELens round trips also cover gated (the SAEBench adapter has no gated encoder)
SAELENS_ARCHS = [*ARCHS, ("gated", {}), ("matryoshka", {"k": 5, "matryoshka_widths": [8, 24]})]
EXPECTED_SAELENS_ARCH = {
    "relu": "standard",
    "topk": "topk",
    "batchtopk": "jumprelu",
    "jumprelu": "jumprelu",
    "gated": "gated",
    "matryoshka": "jumprelu",
}


def make_sae(
    arch: str,
    kwargs: dict[str, Any],
    d_in: int = 16,
    d_sae: int = 48,
    d_out: int | None = None,
    seed: int = 0,
) -> SAEBase:
    """An SAE with non-trivial biases and decoder columns far from unit norm (in eval mode)."""
    torch.manual_seed(seed)
    sae = build_sae(arch, d_in, d_sae, output_size=d_out, **kwargs)
    with torch.no_grad():
        sae.decoder.weight.mul_(torch.rand(1, d_sae) * 3 + 0.2)
        encoder_linear(sae).bias.normal_(0, 0.3)
        sae.decoder.bias.normal_()
        for name in ("r_mag", "b_mag"):  # gated: a magnitude path unlike the gate path
            param = getattr(sae, name, None)
            if isinstance(param, torch.Tensor):
                param.normal_(0, 0.5)
    if arch in ("batchtopk", "matryoshka"):  # one training batch sets its inference threshold
        sae.train()
        sae(torch.randn(32, d_in))
    return sae.eval()


def direct_forward(t: dict[str, torch.Tensor], cfg: dict[str, Any], x: torch.Tensor):
    """SAELens' inference computation from its tensors, written out (codes, reconstruction)."""
    sae_in = x - t["b_dec"] if cfg.get("apply_b_dec_to_input") else x
    arch = cfg["architecture"]
    pre = sae_in @ t["W_enc"] + t["b_gate" if arch == "gated" else "b_enc"]
    if arch == "gated":
        c = (pre > 0) * (sae_in @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"]).relu()
        return c, c @ t["W_dec"] + t["b_dec"]
    if arch == "topk":
        if cfg.get("rescale_acts_by_decoder_norm"):
            pre = pre * t["W_dec"].norm(dim=1)
        vals, idx = pre.topk(cfg["k"], dim=-1)
        c = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        w_dec = t["W_dec"]
        if cfg.get("rescale_acts_by_decoder_norm"):
            w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        return c, c @ w_dec + t["b_dec"]
    c = pre.relu()
    if arch in ("jumprelu", "jumprelu_transcoder"):
        c = c * (pre > t["threshold"])
    return c, c @ t["W_dec"] + t["b_dec"]


# --- SAELens format: export -> import -----------------------------------------------------------
@pytest.mark.parametrize("arch,kwargs", SAELENS_ARCHS, ids=[a for a, _ in SAELENS_ARCHS])
def test_export_import_roundtrip(arch: str, kwargs: dict[str, Any], tmp_path: Path) -> None:
    sae = make_sae(arch, kwargs)
    freq = torch.rand(48) * (torch.rand(48) > 0.2)
    folder = save_saelens(sae, tmp_path / arch, HOOK, model_name="tiny", feature_frequency=freq)
    sparsity = load_file(str(folder / "sparsity.safetensors"))["sparsity"]
    assert torch.equal(sparsity, torch.log10(freq.double() + 1e-10).float())
    assert sparsity[freq == 0].tolist() == [-10.0] * int((freq == 0).sum())
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == EXPECTED_SAELENS_ARCH[arch]
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (16, 48, "float32")
    assert cfg["apply_b_dec_to_input"] is False and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == HOOK and cfg["metadata"]["model_name"] == "tiny"
    assert cfg["hook_layer"] == 1
    # the SAELens version the export was written for: the installed one (else the format's)
    try:
        installed = importlib.metadata.version("sae-lens")
    except importlib.metadata.PackageNotFoundError:
        installed = "6.0.0"
    assert cfg["metadata"]["sae_lens_version"] == installed
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    assert tensors["W_enc"].shape == (16, 48) and tensors["W_dec"].shape == (48, 16)
    assert torch.allclose(tensors["W_dec"].norm(dim=1), torch.ones(48), atol=1e-6)
    if arch in ("topk",):
        assert cfg["k"] == 5
    if arch in ("jumprelu", "batchtopk", "matryoshka"):
        assert tensors["threshold"].shape == (48,)
    if arch == "matryoshka":  # as SAELens saves its own: the training setup in metadata
        assert cfg["metadata"]["training_architecture"] == "matryoshka_batchtopk"
        assert cfg["metadata"]["matryoshka_widths"] == [8, 24, 48]
    if arch == "gated":  # SAELens' gated SAE has b_gate instead of b_enc
        assert sorted(tensors) == ["W_dec", "W_enc", "b_dec", "b_gate", "b_mag", "r_mag"]
        assert all(tensors[k].shape == (48,) for k in ("b_gate", "b_mag", "r_mag"))

    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        out, c = sae(x)
        # the files alone, read the SAELens way, give our numbers
        c_file, out_file = direct_forward(tensors, read_saelens_cfg(folder), x)
        assert torch.allclose(c_file, c, atol=1e-5) and torch.allclose(out_file, out, atol=1e-5)
        back, info = load_saelens_sae(folder)
        back.eval()
        out2, c2 = back(x)
        assert torch.allclose(out2, out, atol=1e-6) and torch.allclose(c2, c, atol=1e-6)
        assert torch.allclose(back.encode(x), sae.encode(x), atol=1e-6)
        assert torch.allclose(back.decode(c), sae.decode(c), atol=1e-6)
    assert info.hook_name == HOOK and info.position == HOOK and info.model_name == "tiny"
    assert (c != 0).any() and (c == 0).any()


def write_saelens_folder(path: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors")
    )
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def saelens_tensors(
    d_in: int = 12, d_sae: int = 40, d_out: int | None = None, seed: int = 1, gated: bool = False
):
    g = torch.Generator().manual_seed(seed)
    d_out = d_out or d_in
    w_dec = torch.randn(d_sae, d_out, generator=g) * (torch.rand(d_sae, 1, generator=g) * 4 + 0.1)
    t = {
        "W_enc": torch.randn(d_in, d_sae, generator=g) * 0.5,
        "b_enc": torch.randn(d_sae, generator=g) * 0.2,
        "W_dec": w_dec,
        "b_dec": torch.randn(d_out, generator=g),
        "threshold": torch.rand(d_sae, generator=g) * 0.5,
    }
    if gated:
        t["b_gate"] = t.pop("b_enc")
        t["r_mag"] = torch.randn(d_sae, generator=g) * 0.5
        t["b_mag"] = torch.randn(d_sae, generator=g) * 0.5
    return t


@pytest.mark.parametrize(
    "cfg",
    [
        {"architecture": "standard", "apply_b_dec_to_input": True},
        {"architecture": "jumprelu", "apply_b_dec_to_input": True},
        {"architecture": "topk", "k": 6, "rescale_acts_by_decoder_norm": True},
        # pre-6 flat layout: no metadata, hook_point, topk via activation_fn_str
        {
            "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": 6},
            "rescale_acts_by_decoder_norm": True,
            "hook_point": HOOK,
        },
        {"architecture": "transcoder", "d_out": 20, "apply_b_dec_to_input": False},
        {"architecture": "gated", "apply_b_dec_to_input": True},
    ],
    ids=["standard", "jumprelu", "topk", "pre6-topk", "transcoder", "gated"],
)
def test_import_folds_decoder_norms(cfg: dict[str, Any], tmp_path: Path) -> None:
    """A SAELens SAE with non-unit decoder rows gives the same reconstruction after loading;
    the codes come out scaled by the decoder norms."""
    d_out = cfg.get("d_out")
    t = saelens_tensors(d_out=d_out, gated=cfg.get("architecture") == "gated")
    full = {"d_in": 12, "d_sae": 40, "dtype": "float32", "normalize_activations": "none", **cfg}
    if "hook_point" not in cfg:
        out_hook = "blocks.1.hook_mlp_out" if d_out else None
        full["metadata"] = {
            "sae_lens_version": "6.5.0",
            "hook_name": HOOK,
            "hook_name_out": out_hook,
        }
    folder = write_saelens_folder(tmp_path / "sl", full, t)
    sae, info = load_saelens_sae(folder)
    x = torch.randn(50, 12)
    flat = read_saelens_cfg(folder)
    ref_c, ref_out = direct_forward(t, flat, x)
    with torch.no_grad():
        out, c = sae(x)
    assert torch.allclose(out, ref_out, atol=1e-5, rtol=1e-5)
    norms = t["W_dec"].norm(dim=1)
    if flat["architecture"] == "topk":  # SAELens itself selects and codes on norm-scaled values
        norms = torch.ones_like(norms)
    assert torch.allclose(c, ref_c * norms, atol=1e-5, rtol=1e-5)
    assert torch.allclose(sae.dict_elements.norm(dim=0), torch.ones(40), atol=1e-6)
    assert info.hook_name == HOOK and (ref_c != 0).any() and (ref_c == 0).any()
    if d_out:
        assert sae.output_size == 20 and info.position == "blocks.1.hook_mlp_out"


def test_import_refuses_inexact_topk_and_bad_configs(tmp_path: Path) -> None:
    t = saelens_tensors()
    base = {"d_in": 12, "d_sae": 40, "metadata": {"sae_lens_version": "6.5.0", "hook_name": HOOK}}
    folder = write_saelens_folder(tmp_path / "a", {**base, "architecture": "topk", "k": 4}, t)
    with pytest.raises(UserError, match="cannot be loaded exactly"):
        load_saelens_sae(folder)
    sae, _ = load_saelens_sae(folder, allow_inexact=True)  # selects on norm-scaled values
    assert int((sae.encode(torch.randn(3, 12)) != 0).sum(-1).max()) == 4
    for name, extra in [
        ("b", {"architecture": "gated"}),
        ("c", {"architecture": "standard", "normalize_activations": "layer_norm"}),
        ("d", {"architecture": "standard", "d_sae": 41}),
    ]:
        folder = write_saelens_folder(tmp_path / name, {**base, **extra}, t)
        with pytest.raises(UserError) as err:
            load_saelens_sae(folder)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="cfg.json"):
        load_saelens_sae(tmp_path)
    # a gated SAE needs its magnitude path; SAELens has no gated transcoder to export to
    gated = saelens_tensors(gated=True)
    del gated["r_mag"]
    folder = write_saelens_folder(tmp_path / "e", {**base, "architecture": "gated"}, gated)
    with pytest.raises(UserError, match="r_mag"):
        load_saelens_sae(folder)
    with pytest.raises(UserError, match="no 'gated' transcoder"):
        save_saelens(make_sae("gated", {}, d_out=24), tmp_path / "f", HOOK, hook_name_out="x")


# --- SAELens itself (optional extra) -------------------------------------------------------------
@pytest.mark.parametrize("arch,kwargs", SAELENS_ARCHS, ids=[a for a, _ in SAELENS_ARCHS])
def test_saelens_loads_our_export(arch: str, kwargs: dict[str, Any], tmp_path: Path) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    sae = make_sae(arch, kwargs)
    folder = save_saelens(sae, tmp_path / arch, HOOK, model_name="tiny")
    theirs = sae_lens.SAE.load_from_disk(str(folder))
    x = torch.randn(4, 6, 16)
    with torch.no_grad():
        out, c = sae(x)
        assert torch.allclose(theirs.encode(x), c, atol=1e-5)
        assert torch.allclose(theirs.decode(c), sae.decode(c), atol=1e-5)
        assert torch.allclose(theirs(x), out, atol=1e-5)


def test_saelens_transcoder_export_and_their_saes_import(tmp_path: Path) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    tc = make_sae("relu", {}, d_in=16, d_out=24)
    folder = save_saelens(tc, tmp_path / "tc", HOOK, hook_name_out="blocks.1.hook_mlp_out")
    theirs = sae_lens.SAE.load_from_disk(str(folder))
    assert type(theirs).__name__ == "Transcoder"
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.allclose(theirs(x), tc(x)[0], atol=1e-5)
    # the reverse: SAEs saved by SAELens itself (non-unit decoder rows, b_dec applied to input)
    from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

    torch.manual_seed(3)
    pairs: list[tuple[Any, Any]] = [
        (StandardSAE, StandardSAEConfig),
        (JumpReLUSAE, JumpReLUSAEConfig),
        (GatedSAE, GatedSAEConfig),
    ]
    for cls, cfg_cls in pairs:
        cfg = cfg_cls(d_in=16, d_sae=32, metadata=SAEMetadata(hook_name=HOOK, model_name="tiny"))
        s = cls(cfg)
        with torch.no_grad():
            for name, p in s.named_parameters():
                p.copy_(torch.randn_like(p) * 0.5)
                if name == "threshold":  # SAELens thresholds are >= 0
                    p.abs_()
        out_dir = tmp_path / cfg_cls.architecture()
        s.save_model(out_dir)
        ours, _ = load_saelens_sae(out_dir)
        with torch.no_grad():
            assert torch.allclose(ours(x)[0], s(x), atol=1e-5)


# --- a trained run: export CLI, from_saelens, pretrained_sae_paths -----------------------------
@pytest.fixture(scope="module")
def trained_run(token_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = make_config_dict(
        token_data,
        tmp_path_factory.mktemp("runs"),
        n_samples=16,
        save_every_n_samples=8,
        saes={"sae_positions": [HOOK, "blocks.2.hook_resid_pre"], "dict_size_to_input_ratio": 2.0},
    )
    config = load_config(cfg)
    assert isinstance(config, Config)
    return train(config, progress=False)


def test_export_cli_and_from_saelens(trained_run: Path, token_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    assert main(["export", str(trained_run), str(out), "--format", "saelens"]) == 0
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert [p.name for p in folders] == [HOOK, "blocks.2.hook_resid_pre"]
    cfg = json.loads((folders[0] / "cfg.json").read_text())
    assert cfg["metadata"]["context_size"] == 16
    assert cfg["metadata"]["e2e_sae_config"]["saes"]["sae_positions"][0] == HOOK

    model = SAETransformer.from_local_path(trained_run, device="cpu")
    # exporting the loaded model (instead of the directory, read without its LM) writes the same
    again = export_run_saelens(model, tmp_path / "again")
    for a, b in zip(folders, again, strict=True):
        ta, tb = (load_file(str(f / "sae_weights.safetensors")) for f in (a, b))
        assert all(torch.equal(ta[k], tb[k]) for k in ta) and ta.keys() == tb.keys()
    spliced = saelens_transformer(model.tlens_model, [str(f) for f in folders])
    assert spliced.sae_positions == model.sae_positions
    tokens = torch.randint(0, TINY_TLENS["d_vocab"], (2, 16))
    with torch.no_grad():
        logits, acts = model(tokens)
        logits2, acts2 = spliced(tokens)
    assert logits is not None and logits2 is not None
    assert torch.allclose(logits2, logits, atol=1e-5)
    assert torch.allclose(acts2[HOOK].c, acts[HOOK].c, atol=1e-5)

    # a SAELens folder as saes.pretrained_sae_paths, into a fresh model of the same config
    config = load_config(trained_run / "final_config.yaml")
    assert isinstance(config, Config)
    fresh = SAETransformer.from_config(config, device="cpu")
    frozen = load_pretrained_saes(fresh, [folders[0]], retrain=False)
    assert frozen == {HOOK}
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.allclose(fresh.sae(HOOK)(x)[0], model.sae(HOOK)(x)[0], atol=1e-5)

    # ... and KL fine-tuning it: training starts from the imported SAE and moves it
    ft = load_config(
        make_config_dict(
            token_data,
            tmp_path / "ft",
            n_samples=8,
            loss={"logits_kl": {"coeff": 1.0}},
            saes={
                "sae_positions": [HOOK],
                "dict_size_to_input_ratio": 2.0,
                "pretrained_sae_paths": [str(folders[0])],
                "retrain_saes": True,
            },
        )
    )
    assert isinstance(ft, Config)
    tuned = load_file(str(list_checkpoints(train(ft, progress=False))[-1]))
    start = load_file(str(folders[0] / "sae_weights.safetensors"))
    delta = (tuned[f"{HOOK.replace('.', '-')}.encoder.0.weight"].T - start["W_enc"]).abs().max()
    assert 0 < float(delta) < 0.1

    # errors are one line, exit 2
    assert main(["export", str(tmp_path / "nope"), str(out)]) == 2
    wrong = build_random_model(dict(TINY_TLENS, d_model=48, d_head=12))
    with pytest.raises(UserError, match="SAE maps 32"):
        saelens_transformer(wrong, [folders[0]])


def test_export_writes_sparsity_from_the_runs_eval(trained_run: Path, tmp_path: Path) -> None:
    from e2e_sae.eval.evaluate import read_feature_frequency

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert main(["export", str(run), str(tmp_path / "before")]) == 0
    assert not list((tmp_path / "before").rglob("sparsity.safetensors"))  # no eval yet
    assert main(["eval", str(run), "--n-tokens", "128"]) == 0
    freqs = read_feature_frequency(run)
    counts = json.loads((run / "eval.json").read_text())["n_tokens"]
    assert counts == 128 and set(freqs) == {HOOK, "blocks.2.hook_resid_pre"}
    out = tmp_path / "export"
    assert main(["export", str(run), str(out)]) == 0
    for pos, freq in freqs.items():
        sparsity = load_file(str(out / pos / "sparsity.safetensors"))["sparsity"]
        assert torch.equal(sparsity, torch.log10(freq.double() + 1e-10).float())
    # the same from the loaded model, which remembers its run directory
    again = export_run_saelens(
        SAETransformer.from_local_path(run, device="cpu"), tmp_path / "again"
    )
    assert torch.equal(
        load_file(str(again[0] / "sparsity.safetensors"))["sparsity"],
        load_file(str(out / HOOK / "sparsity.safetensors"))["sparsity"],
    )
    # an older checkpoint than the evaluated (newest) one gets none
    older = list_checkpoints(run)[0]
    assert older != list_checkpoints(run)[-1]
    export_run_saelens(run, tmp_path / "older", checkpoint=older.name)
    assert (tmp_path / "older" / HOOK / "cfg.json").is_file()
    assert not list((tmp_path / "older").rglob("sparsity.safetensors"))
    # eval.json names the checkpoint it measured: an eval of the older one serves its export
    older_model = SAETransformer.from_local_path(run, checkpoint=older.name, device="cpu")
    assert main(["eval", str(run), "--n-tokens", "128"]) == 0  # same settings: rewritten
    from e2e_sae.eval.evaluate import EVAL_JSON, evaluate_run, write_eval

    write_eval(evaluate_run(older_model, n_tokens=128), run / EVAL_JSON, overwrite=True)
    assert json.loads((run / EVAL_JSON).read_text())["settings"]["checkpoint"] == older.name
    export_run_saelens(run, tmp_path / "older2", checkpoint=older.name)
    assert (tmp_path / "older2" / HOOK / "sparsity.safetensors").is_file()
    export_run_saelens(run, tmp_path / "newest")  # the newest was not measured: none
    assert not list((tmp_path / "newest").rglob("sparsity.safetensors"))


# --- Hugging Face Hub against a local folder -----------------------------------------------------
class FakeHub:
    """Stands in for the Hub: `HfApi` uploads land in `root/<repo_id>/`, `snapshot_download`
    serves from there, both honouring allow_patterns via huggingface_hub's own filter."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[str] = []

    def api(self, token: str | None = None) -> Any:
        hub_ = self

        class Api:
            def create_repo(self, repo_id: str, private: bool = False, exist_ok: bool = False):
                hub_.calls.append(f"create {repo_id} private={private}")
                (hub_.root / repo_id).mkdir(parents=True, exist_ok=True)

            def upload_folder(
                self,
                folder_path: str,
                repo_id: str,
                path_in_repo: str | None,
                allow_patterns: list[str],
                **kw: Any,
            ) -> None:
                from huggingface_hub.utils import filter_repo_objects

                src = Path(folder_path)
                files = [str(p.relative_to(src)) for p in src.rglob("*") if p.is_file()]
                dest = hub_.root / repo_id / (path_in_repo or "")
                for rel in filter_repo_objects(files, allow_patterns=allow_patterns):
                    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(src / rel, dest / rel)
                hub_.calls.append(f"upload {repo_id}")

            def upload_file(
                self, path_or_fileobj: bytes, path_in_repo: str, repo_id: str, **kw: Any
            ) -> None:
                (hub_.root / repo_id / path_in_repo).write_bytes(path_or_fileobj)

        return Api()

    def snapshot_download(
        self, repo_id: str, revision: str | None, allow_patterns: list[str] | None, cache_dir: Any
    ) -> str:
        from huggingface_hub.utils import filter_repo_objects

        src = self.root / repo_id
        if not src.exists():
            raise FileNotFoundError(f"Repository Not Found for url: {repo_id}")
        out = self.root.parent / "cache" / repo_id
        files = [str(p.relative_to(src)) for p in src.rglob("*") if p.is_file()]
        for rel in filter_repo_objects(files, allow_patterns=allow_patterns):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / rel, out / rel)
        return str(out)


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    import huggingface_hub

    fake = FakeHub(tmp_path / "remote")
    monkeypatch.setattr(huggingface_hub, "HfApi", fake.api)
    monkeypatch.setattr(hub, "snapshot_download", fake.snapshot_download)
    return fake


def test_hf_uris() -> None:
    u = hub.parse_hf_uri("hf://alice/saes@v2/gpt2/blocks.6.hook_resid_pre")
    assert (u.repo_id, u.revision, u.subfolder) == (
        "alice/saes",
        "v2",
        "gpt2/blocks.6.hook_resid_pre",
    )
    assert hub.parse_hf_uri(Path("hf://alice/saes")) == hub.HfUri("alice/saes", "", None)
    assert hub.is_hf_uri(Path("hf://a/b")) and not hub.is_hf_uri("runs/hf")
    for bad in ("hf://alice", "hf://alice/saes/../x", "hf:///x"):
        with pytest.raises(UserError):
            hub.parse_hf_uri(bad)
    assert hub.resolve_path("some/dir") == Path("some/dir")


def test_push_and_load_through_hub(trained_run: Path, tmp_path: Path, fake_hub: FakeHub) -> None:
    export = tmp_path / "export"
    export_run_saelens(trained_run, export)
    assert main(["push", str(export), "alice/saes", "--private"]) == 0
    assert fake_hub.calls[0] == "create alice/saes private=True"
    remote = fake_hub.root / "alice/saes"
    assert (remote / HOOK / "cfg.json").is_file()
    assert "library_name: saelens" in (remote / "README.md").read_text()

    model = SAETransformer.from_local_path(trained_run, device="cpu")
    spliced = saelens_transformer(model.tlens_model, [f"hf://alice/saes/{HOOK}"])
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.allclose(spliced.sae(HOOK)(x)[0], model.sae(HOOK)(x)[0], atol=1e-5)

    # a run directory: config + newest checkpoint only; loads back by hf:// URI
    uri = hub.push_to_hub(trained_run, "alice/run", "r1")
    assert uri == "hf://alice/run/r1"
    pushed = sorted(p.name for p in (fake_hub.root / "alice/run/r1").iterdir())
    newest = list_checkpoints(trained_run)[-1].name
    assert "final_config.yaml" in pushed and newest in pushed
    assert [n for n in pushed if n.startswith("samples_")] == [newest]
    again = hub.load_from_hub(uri)
    saved = load_file(str(list_checkpoints(trained_run)[-1]))
    for k, v in again.saes.state_dict().items():
        assert torch.equal(v, saved[k])
    # hf:// inside pretrained_sae_paths (pydantic turns it into Path("hf:/alice/..."))
    config = load_config(trained_run / "final_config.yaml")
    assert isinstance(config, Config)
    fresh = SAETransformer.from_config(config, device="cpu")
    assert load_pretrained_saes(fresh, [Path(f"hf://alice/saes/{HOOK}")], True) == set()

    with pytest.raises(UserError, match="cannot download"):
        hub.resolve_path("hf://bob/missing")
    with pytest.raises(UserError, match="neither a run directory"):
        hub.push_to_hub(tmp_path, "alice/x")


# --- W&B -----------------------------------------------------------------------------------------
def read_wandb_records(path: Path) -> list[Any]:
    """Records of a `.wandb` file: a 7-byte header, then LevelDB-log style 32 KiB blocks of
    (crc32 u32, length u16, type u8) chunks (1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, out = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # block padding
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = vars(pb)["Record"]()  # generated protobuf class (no stubs)
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def test_wandb_offline_run_leaves_its_files(
    config_dict: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wandb = pytest.importorskip("wandb")
    for var, val in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "wbcfg"),
        "WANDB_CACHE_DIR": str(tmp_path / "wbcache"),
        "WANDB_DATA_DIR": str(tmp_path / "wbdata"),
    }.items():
        monkeypatch.setenv(var, val)
    config = load_config(config_dict(wandb_project="e2e-sae-test", n_samples=8, lr=2e-3))
    assert isinstance(config, Config)
    run_dir = train(config, progress=False)
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    saved = {p.name for p in (offline / "files").iterdir()}
    assert {"final_config.yaml", "samples_8.safetensors"} <= saved

    wandb.teardown()  # as at process exit: the wandb service flushes its .wandb file
    records = read_wandb_records(next(offline.glob("run-*.wandb")))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "e2e-sae-test" and run.display_name == run_dir.name
    cfg = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert cfg["lr"] == 2e-3 and cfg["saes"]["sae_positions"] == [HOOK]
    history = [
        {("/".join(i.nested_key) or i.key): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert history[0]["loss"] == pytest.approx(metrics[0]["loss"], rel=1e-6)
    hist_key = f"eval/feature_frequency/{HOOK}/values"
    counts = next(h[hist_key] for h in history if hist_key in h)
    assert sum(counts) == 64  # one entry per latent (d_sae = 2 * 32)


def test_frequency_histogram_matches_numpy() -> None:
    np = pytest.importorskip("numpy")
    from e2e_sae.training.runlog import frequency_histograms

    freqs = torch.tensor([0.0, 1e-4, 1e-3, 0.02, 0.5, 0.5, 1.0])
    (h,) = frequency_histograms({"p": freqs}, num_bins=5).values()
    counts, bins = np.histogram(np.log10(np.clip(freqs.double().numpy(), 1e-10, None)), bins=5)
    assert list(h.histogram) == counts.tolist()
    assert np.allclose(h.bins, bins)


def test_from_wandb_downloads_newest_checkpoint(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("E2E_SAE_CACHE", str(tmp_path / "cache"))
    asked: list[str] = []

    class File:
        def __init__(self, path: Path) -> None:
            self.name, self.path = path.name, path

        def download(self, root: str, replace: bool = False) -> None:
            shutil.copy(self.path, Path(root) / self.name)

    class Run:
        def files(self) -> list[File]:
            names = [
                "final_config.yaml",
                "metrics.jsonl",
                *[p.name for p in list_checkpoints(trained_run)],
            ]
            return [File(trained_run / n) for n in names]

    class Api:
        def run(self, path: str) -> Run:
            asked.append(path)
            if path != "ent/proj/abc123":
                raise ValueError(f"Could not find run {path}")
            return Run()

    monkeypatch.setattr(wandb, "Api", Api)
    ckpts = list_checkpoints(trained_run)
    assert len(ckpts) == 2
    model = SAETransformer.from_wandb("ent/proj/abc123", device="cpu")
    newest = load_file(str(ckpts[-1]))
    for k, v in model.saes.state_dict().items():
        assert torch.equal(v, newest[k])
    local = tmp_path / "cache" / "wandb" / "ent_proj_abc123"
    assert sorted(p.name for p in local.iterdir()) == ["final_config.yaml", ckpts[-1].name]
    with pytest.raises(UserError, match="Could not find run"):
        SAETransformer.from_wandb("ent/proj/nope")
    with pytest.raises(UserError, match="entity/project/run_id"):
        SAETransformer.from_wandb("proj/abc123")
    assert asked == ["ent/proj/abc123", "ent/proj/nope"]


# --- SAEBench adapter ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch,kwargs", ARCHS, ids=[a for a, _ in ARCHS])
def test_saebench_adapter(arch: str, kwargs: dict[str, Any]) -> None:
    tlens = build_random_model(dict(TINY_TLENS))
    model = SAETransformer(tlens, [HOOK], 2.0, architecture=arch, architecture_kwargs=kwargs)
    ours = make_sae(arch, kwargs, d_in=32, d_sae=64)
    model.saes[HOOK.replace(".", "-")] = ours
    sb = to_saebench(model, HOOK, model_name="tiny-model")
    cfg = sb.cfg
    assert (cfg.d_in, cfg.d_sae, cfg.hook_name, cfg.hook_layer) == (32, 64, HOOK, 1)
    assert (cfg.model_name, cfg.dtype, cfg.device) == ("tiny-model", "float32", "cpu")
    assert sb.W_enc.shape == (32, 64) and sb.W_dec.shape == (64, 32)
    assert sb.b_enc.shape == (64,) and sb.b_dec.shape == (32,)
    assert sb.check_decoder_norms()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        out, c = ours(x)
        assert torch.allclose(sb.encode(x), c, atol=1e-5)
        assert torch.allclose(sb.decode(c), ours.decode(c), atol=1e-5)
        assert torch.allclose(sb(x), out, atol=1e-5)
        manual = F.relu(x @ sb.W_enc + sb.b_enc)  # SAEBench's weight-based metrics read these
        assert torch.allclose(manual[c != 0], c[c != 0], atol=1e-5)
    sb = sb.to(dtype=torch.float64)
    assert sb.dtype == torch.float64 and sb.cfg.dtype == "float64"
    with pytest.raises(UserError, match="no SAE at"):
        to_saebench(model, "blocks.0.hook_resid_pre")
