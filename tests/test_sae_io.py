"""SAELens-compatible save/load (SPEC 4): round trip, hand-written SAELens directories in both cfg styles,
corrupt / missing files, unsupported architectures, source resolution (run dirs, releases, hf://)."""

import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from domain_sae.errors import UserError
from domain_sae.sae.io import SAEFormatError, SAESourceError, load_sae, load_sparsity, read_cfg
from domain_sae.sae.registry import UnsupportedArchitectureError
from domain_sae.sae.standard import SAEModelConfig, StandardSAE

D_IN, D_SAE = 5, 12


def weights(seed=0, d_in=D_IN, d_sae=D_SAE):
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d_in, d_sae, generator=g), "b_enc": torch.randn(d_sae, generator=g) * 0.1,
            "W_dec": torch.randn(d_sae, d_in, generator=g), "b_dec": torch.randn(d_in, generator=g)}


def reference_forward(w, x, apply_b_dec):
    """Independent float64 SAE forward: relu((x - a b_dec) W_enc + b_enc) W_dec + b_dec."""
    w = {k: v.double() for k, v in w.items()}
    x = x.double()
    f = torch.relu((x - (w["b_dec"] if apply_b_dec else 0)) @ w["W_enc"] + w["b_enc"])
    return f, f @ w["W_dec"] + w["b_dec"]


def make_sae(seed=0, **cfg_kw):
    meta = {"model_name": "tiny-llama", "hook_name": "blocks.1.hook_resid_post", "context_size": 32,
            "prepend_bos": True, "dataset_path": "chat", "training_tokens": 1000,
            "lineage": {"parent": None, "tokens_before": 0}}
    sae = StandardSAE(SAEModelConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta, **cfg_kw))
    with torch.no_grad():
        for k, v in weights(seed).items():
            getattr(sae, k).copy_(v)
    return sae


# -- our own format -------------------------------------------------------------------------------------------------

def test_round_trip_is_identical(tmp_path):
    sae = make_sae(apply_b_dec_to_input=True, mse_loss_normalization="dense_batch", lp_norm=2.0,
                   scale_sparsity_penalty_by_decoder_norm=False)
    sparsity = torch.linspace(-10, 0, D_SAE)
    sae.save(tmp_path / "out", sparsity=sparsity)
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"cfg.json", "sae_weights.safetensors",
                                                               "sparsity.safetensors"}
    loaded = StandardSAE.load(tmp_path / "out")
    for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded, k), getattr(sae, k))
    for f in ("architecture", "d_in", "d_sae", "dtype", "apply_b_dec_to_input", "normalize_activations",
              "mse_loss_normalization", "lp_norm", "scale_sparsity_penalty_by_decoder_norm",
              "normalize_sae_decoder"):
        assert getattr(loaded.cfg, f) == getattr(sae.cfg, f), f
    for k, v in sae.cfg.metadata.items():
        assert loaded.cfg.metadata[k] == v
    assert loaded.cfg.metadata["source_path"] == str((tmp_path / "out").resolve())
    assert torch.equal(load_sparsity(tmp_path / "out"), sparsity)
    x = torch.randn(7, D_IN)
    assert torch.equal(loaded(x), sae(x))


def test_cfg_json_has_the_saelens6_layout(tmp_path):
    make_sae().save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    for k in ("architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
              "reshape_activations", "metadata"):
        assert k in cfg
    assert cfg["architecture"] == "standard" and cfg["d_in"] == D_IN and cfg["d_sae"] == D_SAE
    meta = cfg["metadata"]
    assert meta["model_name"] == "tiny-llama" and meta["hook_name"] == "blocks.1.hook_resid_post"
    assert meta["hook_layer"] == 1 and meta["context_size"] == 32 and meta["training_tokens"] == 1000
    assert meta["sae_lens_version"].startswith("6.")  # so that SAELens reads the nested layout as v6
    assert load_sparsity(tmp_path) is None  # no sparsity given -> no file


def test_bfloat16_round_trip(tmp_path):
    sae = make_sae().to(torch.bfloat16)
    sae.save(tmp_path)
    loaded = load_sae(tmp_path)
    assert loaded.dtype == torch.bfloat16 and loaded.cfg.dtype == "bfloat16"
    assert torch.equal(loaded.W_dec, sae.W_dec)


def test_load_run_directory_uses_its_sae_folder(tmp_path):
    make_sae().save(tmp_path / "run" / "sae")
    (tmp_path / "run" / "config.json").write_text("{}")
    loaded = load_sae(tmp_path / "run")
    assert loaded.cfg.metadata["source_path"] == str((tmp_path / "run" / "sae").resolve())
    assert torch.equal(load_sae(tmp_path / "run" / "sae" / "cfg.json").W_enc, loaded.W_enc)


# -- SAELens directories written by hand --------------------------------------------------------------------------

def write_dir(path, cfg, w, sparsity=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(w, str(path / "sae_weights.safetensors"))
    if sparsity is not None:
        save_file({"sparsity": sparsity}, str(path / "sparsity.safetensors"))
    return path


def saelens6_cfg(**kw):
    cfg = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_pre", "hook_layer": 3,
                        "hook_head_index": None, "model_class_name": "HookedTransformer", "prepend_bos": True,
                        "context_size": 128, "dataset_path": "monology/pile-uncopyrighted",
                        "sae_lens_version": "6.5.1", "sae_lens_training_version": "6.5.1",
                        "neuronpedia_id": None}}
    cfg.update(kw)
    return cfg


def flat_cfg_v5():
    return {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "activation_fn_str": "relu",
            "activation_fn_kwargs": {}, "apply_b_dec_to_input": False, "finetuning_scaling_factor": False,
            "context_size": 64, "model_name": "pythia-70m", "hook_name": "blocks.2.hook_mlp_out", "hook_layer": 2,
            "hook_head_index": None, "prepend_bos": True, "dataset_path": "NeelNanda/pile-10k",
            "dataset_trust_remote_code": True, "normalize_activations": "none", "dtype": "torch.float32",
            "device": "cuda", "sae_lens_training_version": "3.12.0", "neuronpedia_id": None,
            "model_from_pretrained_kwargs": {}}


def flat_cfg_old():
    """The oldest layout: hook_point / hook_point_layer, no architecture, boolean normalize_activations, training
    hyper-parameters mixed in."""
    return {"model_name": "gpt2-small", "hook_point": "blocks.8.hook_resid_pre", "hook_point_layer": 8,
            "hook_point_head_index": None, "dataset_path": "Skylion007/openwebtext", "is_dataset_tokenized": False,
            "context_size": 128, "use_cached_activations": False, "d_in": D_IN, "d_sae": D_SAE,
            "b_dec_init_method": "geometric_median", "expansion_factor": 32, "activation_fn_str": "relu",
            "normalize_activations": False, "lr": 0.0004, "l1_coefficient": 8e-05, "lp_norm": 1,
            "train_batch_size": 4096, "dtype": "torch.float32", "device": "cuda", "prepend_bos": True,
            "mse_loss_normalization": None}


@pytest.mark.parametrize("style", ["v6", "flat_v5", "flat_old"])
def test_hand_written_saelens_dirs_load_with_the_same_function(tmp_path, style):
    cfg = {"v6": saelens6_cfg, "flat_v5": flat_cfg_v5, "flat_old": flat_cfg_old}[style]()
    w = weights(seed=4)
    d = write_dir(tmp_path / style, cfg, w, sparsity=torch.full((D_SAE,), -3.0))
    sae = load_sae(d)
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)  # absent in the oldest layout: SAELens defaults to True
    assert sae.cfg.apply_b_dec_to_input is apply_b_dec
    x = torch.randn(9, D_IN)
    f_ref, x_hat_ref = reference_forward(w, x, apply_b_dec)
    x_hat, f = sae.forward_with_latents(x)
    torch.testing.assert_close(f.double(), f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat.double(), x_hat_ref, rtol=1e-5, atol=1e-5)
    meta = sae.cfg.metadata
    expected_hook = {"v6": "blocks.3.hook_resid_pre", "flat_v5": "blocks.2.hook_mlp_out",
                     "flat_old": "blocks.8.hook_resid_pre"}[style]
    assert meta["hook_name"] == expected_hook
    assert meta["model_name"] == cfg.get("model_name", cfg.get("metadata", {}).get("model_name"))
    assert meta["context_size"] == cfg.get("context_size", cfg.get("metadata", {}).get("context_size"))
    assert sae.cfg.normalize_activations == "none" and sae.cfg.dtype == "float32"
    assert "lr" not in meta  # training hyper-parameters of old configs are not metadata
    assert torch.equal(load_sparsity(d), torch.full((D_SAE,), -3.0))


def test_old_finetuning_scaling_factor_is_folded_into_the_decoder(tmp_path):
    cfg = flat_cfg_v5()
    cfg["finetuning_scaling_factor"] = True
    w = weights(seed=2)
    scale = torch.linspace(0.5, 2.0, D_SAE)
    write_dir(tmp_path, cfg, {**w, "scaling_factor": scale})
    sae = load_sae(tmp_path)
    x = torch.randn(6, D_IN)
    f_ref, _ = reference_forward(w, x, False)
    x_hat_ref = (f_ref * scale.double()) @ w["W_dec"].double() + w["b_dec"].double()
    torch.testing.assert_close(sae(x).double(), x_hat_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.encode(x).double(), f_ref, rtol=1e-5, atol=1e-5)


def test_unfolded_expected_average_scale_is_folded_when_known(tmp_path):
    cfg = saelens6_cfg(normalize_activations="expected_average_only_in", apply_b_dec_to_input=False)
    cfg["metadata"]["norm_scaling_factor"] = 4.0
    w = weights(seed=1)
    write_dir(tmp_path, cfg, w)
    sae = load_sae(tmp_path)
    x = torch.randn(6, D_IN)
    _, x_hat_ref = reference_forward(w, 4.0 * x, False)
    torch.testing.assert_close(sae(x).double(), x_hat_ref / 4.0, rtol=1e-5, atol=1e-5)
    assert sae.cfg.normalize_activations == "none"
    assert sae.cfg.metadata["activation_scale"] == 4.0


def test_saelens_checkpoint_activation_scaler_is_folded(tmp_path):
    """An intermediate SAELens checkpoint keeps normalize_activations=expected_average_only_in and writes the scale
    to activation_scaler.json next to the weights; loading folds it so the SAE takes raw activations."""
    cfg = saelens6_cfg(normalize_activations="expected_average_only_in", apply_b_dec_to_input=True)
    w = weights(seed=6)
    write_dir(tmp_path / "ckpt", cfg, w)
    (tmp_path / "ckpt" / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 2.5,
                                                                          "has_whitening": False}))
    sae = load_sae(tmp_path / "ckpt")
    x = torch.randn(6, D_IN)
    f_ref, x_hat_ref = reference_forward(w, 2.5 * x, True)
    torch.testing.assert_close(sae.encode(x).double(), f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x).double(), x_hat_ref / 2.5, rtol=1e-5, atol=1e-5)
    assert sae.cfg.normalize_activations == "none" and sae.cfg.metadata["activation_scale"] == 2.5
    # an already-folded scaler (null) leaves the weights alone and warns that the scale is unknown
    (tmp_path / "ckpt" / "activation_scaler.json").write_text(json.dumps({"scaling_factor": None}))
    with pytest.warns(UserWarning, match="not folded"):
        unfolded = load_sae(tmp_path / "ckpt")
    assert torch.equal(unfolded.W_enc, w["W_enc"])
    (tmp_path / "ckpt" / "activation_scaler.json").write_text("{broken")
    with pytest.raises(SAEFormatError, match="activation_scaler.json"):
        load_sae(tmp_path / "ckpt")


@pytest.mark.parametrize("cfg", [
    {**saelens6_cfg(), "architecture": "gated"},
    {**saelens6_cfg(), "architecture": "abstopk", "k": 8},
    {**flat_cfg_old(), "activation_fn_str": "tanh-relu"},
])
def test_other_architectures_are_not_supported_yet(tmp_path, cfg):
    write_dir(tmp_path, cfg, weights())
    with pytest.raises(UnsupportedArchitectureError, match="not supported yet") as e:
        load_sae(tmp_path)
    assert isinstance(e.value, UserError)


def test_topk_cfgs_of_both_styles_load_as_topk(tmp_path):
    """SAELens 6 ``architecture: topk, k`` and the old flat ``activation_fn_str: topk`` + kwargs.k."""
    write_dir(tmp_path / "a", {**saelens6_cfg(), "architecture": "topk", "k": 8}, weights())
    write_dir(tmp_path / "b", {**flat_cfg_old(), "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}},
              weights())
    a, b = load_sae(tmp_path / "a"), load_sae(tmp_path / "b")
    assert a.cfg.architecture == b.cfg.architecture == "topk" and (a.cfg.k, b.cfg.k) == (8, 3)


def test_jumprelu_without_threshold_is_a_format_error(tmp_path):
    write_dir(tmp_path, {**saelens6_cfg(), "architecture": "jumprelu"}, weights())
    with pytest.raises(SAEFormatError, match="threshold"):
        load_sae(tmp_path)


# -- broken directories -----------------------------------------------------------------------------------------

def test_missing_files(tmp_path):
    make_sae().save(tmp_path / "a")
    (tmp_path / "a" / "sae_weights.safetensors").unlink()
    with pytest.raises(SAEFormatError, match="sae_weights.safetensors.*missing"):
        load_sae(tmp_path / "a")
    make_sae().save(tmp_path / "b")
    (tmp_path / "b" / "cfg.json").unlink()
    with pytest.raises(SAEFormatError, match="cfg.json"):
        load_sae(tmp_path / "b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAEFormatError, match="not an SAE directory"):
        load_sae(tmp_path / "empty")
    with pytest.raises(SAEFormatError, match="does not exist"):
        load_sae(tmp_path / "nowhere")


def test_corrupt_files(tmp_path):
    make_sae().save(tmp_path)
    f = tmp_path / "sae_weights.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(SAEFormatError, match="sae_weights.safetensors.*corrupt"):
        load_sae(tmp_path)
    f.write_bytes(b"\x80\x04\x95 not safetensors, maybe a pickle")
    with pytest.raises(SAEFormatError, match="sae_weights.safetensors"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(SAEFormatError, match="cfg.json.*JSON"):
        load_sae(tmp_path)


def test_wrong_shapes_missing_tensors_and_bad_values(tmp_path):
    write_dir(tmp_path / "shape", saelens6_cfg(d_sae=D_SAE + 1), weights())
    with pytest.raises(SAEFormatError, match=r"W_enc.*\(5, 12\).*\(5, 13\)"):
        load_sae(tmp_path / "shape")
    w = weights()
    del w["b_enc"]
    write_dir(tmp_path / "missing", saelens6_cfg(), w)
    with pytest.raises(SAEFormatError, match="b_enc"):
        load_sae(tmp_path / "missing")
    w = weights()
    w["W_dec"][0, 0] = float("nan")
    write_dir(tmp_path / "nan", saelens6_cfg(), w)
    with pytest.raises(SAEFormatError, match="W_dec.*NaN"):
        load_sae(tmp_path / "nan")
    write_dir(tmp_path / "nodims", {k: v for k, v in saelens6_cfg().items() if k != "d_sae"}, weights())
    with pytest.raises(SAEFormatError, match="d_sae"):
        read_cfg(tmp_path / "nodims")
    write_dir(tmp_path / "norm", saelens6_cfg(normalize_activations="layer_norm"), weights())
    with pytest.raises(SAEFormatError, match="layer_norm.*not supported"):
        load_sae(tmp_path / "norm")


def test_corrupt_sparsity_file(tmp_path):
    make_sae().save(tmp_path, sparsity=torch.zeros(D_SAE))
    (tmp_path / "sparsity.safetensors").write_bytes(b"garbage")
    with pytest.raises(SAEFormatError, match="sparsity.safetensors"):
        load_sparsity(tmp_path)
    with pytest.raises(ValueError, match="d_sae"):
        make_sae().save(tmp_path / "x", sparsity=torch.zeros(D_SAE + 2))


def test_error_classes_are_user_errors():
    for cls in (SAEFormatError, SAESourceError, UnsupportedArchitectureError):
        assert issubclass(cls, UserError)


# -- remote sources fail fast and clearly ----------------------------------------------------------------------------

def test_release_without_sae_lens_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # import sae_lens -> ImportError
    with pytest.raises(SAESourceError, match="sae-lens"):
        load_sae("gpt2-small-res-jb/blocks.8.hook_resid_pre")


def test_hf_source_offline_fails_fast(monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # HF_HUB_OFFLINE short-circuits the reachability probe: the error comes without any network attempt
    with pytest.raises(SAESourceError, match="unreachable"):
        load_sae("hf://someone/some-saes/layer_3")
    with pytest.raises(SAESourceError, match="OWNER/REPO"):
        load_sae("hf://justowner")
