"""MoSLoRA adapters: golden values of the layer, equivalences (B=0, merge, PEFT LoRA, PEFT export), file round trips.

Tiny random LLaMA- and Qwen2-style LMs are written with save_pretrained and reloaded with
AutoModelForCausalLM.from_pretrained, the path a hub model takes.
"""

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mm_moslora.adapters import (
    ADAPTER_CONFIG_NAME,
    DEFAULT_TARGET_MODULES,
    AdapterConfig,
    MoSLoRALinear,
    adapter_modules,
    adapter_state_dict,
    count_parameters,
    export_peft,
    format_parameter_report,
    inject_adapters,
    load_adapter,
    merge_adapters,
    read_adapter_config,
    save_adapter,
    unload_adapters,
    unmerge_adapters,
)

ARCHS = ("llama", "qwen2")
N_LAYERS = 2


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """{arch: folder of a saved tiny random causal LM}. Different hidden sizes, same module names."""
    common = dict(vocab_size=100, num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64)
    models = {
        "llama": LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, **common)),
        "qwen2": Qwen2ForCausalLM(Qwen2Config(hidden_size=48, intermediate_size=96, **common)),
    }
    dirs = {}
    for arch, model in models.items():
        dirs[arch] = str(tmp_path_factory.mktemp(arch))
        model.save_pretrained(dirs[arch])
    return dirs


def load_base(base_dirs, arch):
    return AutoModelForCausalLM.from_pretrained(base_dirs[arch], dtype=torch.float32).eval()


def logits(model, seed=0):
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def randomize_adapters(model, seed=0):
    """Non-zero A, M and B everywhere (B starts at zero, which would hide most bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in adapter_modules(model).values():
            for param in (module.lora_A, module.lora_M, module.lora_B):
                if param is not None:
                    param.copy_(0.3 * torch.randn(param.shape, generator=gen))


def small_config(**overrides):
    return AdapterConfig(**{"r": 4, "alpha": 8.0, "dropout": 0.0, **overrides})


# 1. Golden values ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("adapter", ["moslora", "lora"])
def test_layer_matches_reference_formula_forward_and_gradients(adapter):
    torch.manual_seed(0)
    layer = MoSLoRALinear(nn.Linear(6, 5), r=3, alpha=6.0, dropout=0.3, adapter=adapter).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    x, g = torch.randn(2, 4, 6), torch.randn(2, 4, 5)
    y = layer(x)
    (y * g).sum().backward()

    W, b = layer.base.weight.detach(), layer.base.bias.detach()
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    M = layer.lora_M.detach() if adapter == "moslora" else torch.eye(3)
    s = 6.0 / 3
    X, G = x.reshape(-1, 6), g.reshape(-1, 5)
    H = X @ A.T                   # A x, (n, r)
    Z = H @ M.T                   # M A x
    expected = X @ W.T + b + s * Z @ B.T
    torch.testing.assert_close(y.reshape(-1, 5), expected, rtol=1e-5, atol=1e-6)
    # Closed-form gradients of L = sum(g * y).
    torch.testing.assert_close(layer.lora_B.grad, s * G.T @ Z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_A.grad, s * (G @ B @ M).T @ X, rtol=1e-5, atol=1e-6)
    if adapter == "moslora":
        torch.testing.assert_close(layer.lora_M.grad, s * (G @ B).T @ H, rtol=1e-5, atol=1e-6)
    else:
        assert layer.lora_M is None and "lora_M" not in dict(layer.named_parameters())
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    torch.testing.assert_close(layer.delta_weight(), s * B @ M @ A, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.folded_A(), M @ A, rtol=1e-5, atol=1e-6)


def test_layer_dtypes_and_dropout():
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = MoSLoRALinear(base, r=4, alpha=8.0)
    assert layer.lora_A.dtype == layer.lora_M.dtype == layer.lora_B.dtype == torch.float32
    assert isinstance(layer.dropout, nn.Identity)
    assert layer(torch.randn(3, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16

    fast = MoSLoRALinear(nn.Linear(16, 8), r=4, alpha=8.0, dropout=0.1, dtype=torch.bfloat16)
    assert fast.lora_M.dtype == torch.bfloat16 and isinstance(fast.dropout, nn.Dropout)
    assert fast(torch.randn(3, 16)).dtype == torch.float32


# 2. B = 0 at init ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_adapters_leave_logits_unchanged(base_dirs, arch):
    model = load_base(base_dirs, arch)
    reference = logits(model)
    inject_adapters(model, small_config(dropout=0.1))
    assert all(torch.count_nonzero(m.lora_B) == 0 for m in adapter_modules(model).values())
    assert torch.equal(logits(model), reference)


# 3. Merge --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_merge_equals_unmerged_and_is_idempotent(base_dirs, arch):
    model = load_base(base_dirs, arch)
    base_logits = logits(model)
    inject_adapters(model, small_config())
    randomize_adapters(model)
    adapted = logits(model)
    assert rel_err(adapted, base_logits) > 1e-3  # the update is not trivially zero
    originals = {n: m.base.weight.clone() for n, m in adapter_modules(model).items()}

    merge_adapters(model)
    assert all(m.merged for m in adapter_modules(model).values())
    assert rel_err(logits(model), adapted) <= 1e-5
    merged_once = {n: m.base.weight.clone() for n, m in adapter_modules(model).items()}
    merge_adapters(model)
    assert all(torch.equal(m.base.weight, merged_once[n]) for n, m in adapter_modules(model).items())

    unmerge_adapters(model)
    unmerge_adapters(model)
    for name, module in adapter_modules(model).items():
        torch.testing.assert_close(module.base.weight, originals[name], rtol=0, atol=1e-6)
    assert rel_err(logits(model), adapted) <= 1e-5


def test_bf16_weight_merges_through_fp32():
    torch.manual_seed(0)
    layer = MoSLoRALinear(nn.Linear(32, 16).to(torch.bfloat16), r=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    weight = layer.base.weight.detach().clone()
    expected = (weight.float() + layer.delta_weight()).to(torch.bfloat16)
    layer.merge()
    assert layer.base.weight.dtype == torch.bfloat16
    assert torch.equal(layer.base.weight, expected)


@pytest.mark.parametrize("merge", [True, False])
def test_unload_restores_plain_linears(base_dirs, merge):
    model = load_base(base_dirs, "llama")
    base_logits = logits(model)
    inject_adapters(model, small_config())
    randomize_adapters(model)
    adapted = logits(model)
    restored = unload_adapters(model, merge=merge)
    assert len(restored) == 7 * N_LAYERS and not adapter_modules(model)
    assert all(type(model.get_submodule(name)) is nn.Linear for name in restored)
    if merge:
        assert rel_err(logits(model), adapted) <= 1e-5
    else:
        assert torch.equal(logits(model), base_logits)


# 4. LoRA path == PEFT's LoRA -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_lora_adapter_equals_peft_lora(base_dirs, arch):
    ours = load_base(base_dirs, arch)
    inject_adapters(ours, small_config(adapter="lora"))
    randomize_adapters(ours)
    peft_model = get_peft_model(load_base(base_dirs, arch), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(DEFAULT_TARGET_MODULES))).eval()
    peft_lm = peft_model.base_model.model
    peft_layers = {n for n, m in peft_lm.named_modules() if isinstance(m, LoraLayer)}
    assert peft_layers == set(adapter_modules(ours))
    with torch.no_grad():
        for name, module in adapter_modules(ours).items():
            peft_layer = peft_lm.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(module.lora_A)
            peft_layer.lora_B["default"].weight.copy_(module.lora_B)
    assert rel_err(logits(ours), logits(peft_model)) <= 1e-5


# 5. Export to a stock PEFT folder ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, use_rslora", [("llama", False), ("qwen2", True)])
def test_export_peft_reproduces_moslora(base_dirs, tmp_path, arch, use_rslora):
    config = small_config(use_rslora=use_rslora, base_model=base_dirs[arch])
    ours = load_base(base_dirs, arch)
    inject_adapters(ours, config)
    randomize_adapters(ours)
    state = adapter_state_dict(ours)
    export_peft(str(tmp_path), config, state, base_model_name_or_path=base_dirs[arch])

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    assert set(saved) == {f"base_model.model.{n}.lora_{ab}.weight" for n in adapter_modules(ours) for ab in "AB"}
    torch.testing.assert_close(saved[f"base_model.model.{name}.lora_A.weight"],
                               state[f"{name}.lora_M"] @ state[f"{name}.lora_A"])
    peft_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["use_rslora"] == use_rslora

    peft_model = PeftModel.from_pretrained(load_base(base_dirs, arch), str(tmp_path)).eval()
    assert rel_err(logits(peft_model), logits(ours)) <= 1e-4


# 6. Trainable parameters ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("adapter", ["moslora", "lora"])
def test_only_adapter_parameters_train(base_dirs, arch, adapter):
    model = load_base(base_dirs, arch)
    names = inject_adapters(model, small_config(adapter=adapter))
    expected = [f"model.layers.{i}.{block}.{proj}" for i in range(N_LAYERS)
                for block, projs in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                     ("mlp", ("gate_proj", "up_proj", "down_proj"))) for proj in projs]
    assert sorted(names) == sorted(expected)
    assert type(model.lm_head) is nn.Linear

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    kinds = {n.rsplit(".", 1)[1] for n in trainable}
    assert kinds == ({"lora_A", "lora_M", "lora_B"} if adapter == "moslora" else {"lora_A", "lora_B"})
    assert len(trainable) == len(names) * len(kinds)
    if adapter == "lora":
        assert not any("lora_M" in n for n, _ in model.named_parameters())

    n_trainable, n_total = count_parameters(model)
    assert n_trainable == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert n_total == sum(p.numel() for p in model.parameters())
    assert f"{n_trainable:,}" in format_parameter_report(model)
    assert f"MoSLoRA layers: {len(names)}" in format_parameter_report(model)


def test_custom_targets_and_errors(base_dirs):
    model = load_base(base_dirs, "llama")
    assert inject_adapters(model, small_config(target_modules=["q_proj", "v_proj"])) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(N_LAYERS) for p in ("q_proj", "v_proj")]
    with pytest.raises(RuntimeError, match="already"):
        inject_adapters(model, small_config())

    model = load_base(base_dirs, "llama")
    assert inject_adapters(model, small_config(target_modules=r"model\.layers\.1\.mlp\.\w+_proj")) == [
        f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]

    for pattern in (["nope_proj"], "lm_head", r"layers\.0\.mlp\.up_proj"):  # the last must fullmatch: no hit
        with pytest.raises(ValueError, match="matched no nn.Linear") as err:
            inject_adapters(load_base(base_dirs, "llama"), small_config(target_modules=pattern))
        assert repr(pattern) in str(err.value) and "model.layers.0.self_attn.q_proj" in str(err.value)


def test_config_dict_round_trip_and_validation():
    config = AdapterConfig(adapter="lora", r=8, alpha=16, target_modules=("q_proj",), base_model="x/y")
    assert AdapterConfig.from_dict(config.to_dict()) == config
    assert config.target_modules == ["q_proj"]
    with pytest.raises(ValueError, match="lora_rank"):
        AdapterConfig.from_dict({**config.to_dict(), "lora_rank": 8})
    with pytest.raises(ValueError, match="adapter"):
        AdapterConfig(adapter="dora")
    with pytest.raises(ValueError, match="regex"):
        AdapterConfig(target_modules="(")


# 7. Save / load --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(base_dirs, tmp_path, arch):
    config = small_config(mixer_init="orthogonal", base_model=base_dirs[arch])
    model = load_base(base_dirs, arch)
    inject_adapters(model, config)
    randomize_adapters(model)
    state = adapter_state_dict(model)
    assert all(k.rsplit(".", 1)[1] in ("lora_A", "lora_M", "lora_B") for k in state)
    assert all(t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad for t in state.values())
    save_adapter(str(tmp_path), config, state)
    assert json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())["format_version"] == 1
    assert read_adapter_config(str(tmp_path)) == config

    fresh = load_base(base_dirs, arch)
    assert load_adapter(fresh, str(tmp_path)) == config
    reloaded = adapter_state_dict(fresh)
    assert reloaded.keys() == state.keys() and all(torch.equal(reloaded[k], state[k]) for k in state)
    assert torch.equal(logits(fresh), logits(model))

    # Loading into a model that already has matching adapters overwrites them.
    inject_adapters(other := load_base(base_dirs, arch), config)
    load_adapter(other, str(tmp_path))
    assert torch.equal(logits(other), logits(model))


def test_load_errors_name_the_module(base_dirs, tmp_path):
    config = small_config()
    model = load_base(base_dirs, "llama")
    inject_adapters(model, config)
    state = adapter_state_dict(model)
    save_adapter(str(tmp_path / "ok"), config, state)

    # Same module names, hidden size 48 instead of 32.
    qwen = load_base(base_dirs, "qwen2")
    with pytest.raises(RuntimeError) as err:
        load_adapter(qwen, str(tmp_path / "ok"))
    assert "model.layers.0.self_attn.q_proj" in str(err.value) and "(4, 32)" in str(err.value)
    assert "(4, 48)" in str(err.value)
    assert not adapter_modules(qwen)  # a failed load leaves the model as it was

    missing = "model.layers.1.mlp.down_proj"
    partial = {k: v for k, v in state.items() if not k.startswith(missing + ".")}
    save_adapter(str(tmp_path / "partial"), config, partial)
    with pytest.raises(RuntimeError, match=f"missing from the checkpoint: {missing}"):
        load_adapter(load_base(base_dirs, "llama"), str(tmp_path / "partial"))
    load_adapter(lenient := load_base(base_dirs, "llama"), str(tmp_path / "partial"), strict=False)
    assert len(adapter_modules(lenient)) == 7 * N_LAYERS

    extra = {**state, "model.layers.5.self_attn.q_proj.lora_A": torch.zeros(4, 32)}
    save_adapter(str(tmp_path / "extra"), config, extra)
    with pytest.raises(RuntimeError, match="no adapter module named model.layers.5.self_attn.q_proj"):
        load_adapter(load_base(base_dirs, "llama"), str(tmp_path / "extra"))

    # A MoSLoRA checkpoint has lora_M tensors that a LoRA layer lacks.
    inject_adapters(as_lora := load_base(base_dirs, "llama"), small_config(adapter="lora"))
    with pytest.raises(RuntimeError, match="moslora"):
        load_adapter(as_lora, str(tmp_path / "ok"))


# 8. Scaling and mixer init ---------------------------------------------------------------------------------------

def test_rslora_scaling_and_orthogonal_mixer():
    assert AdapterConfig(r=16, alpha=32.0).scaling == 2.0
    assert AdapterConfig(r=16, alpha=32.0, use_rslora=True).scaling == 32.0 / 4
    torch.manual_seed(0)
    layer = MoSLoRALinear(nn.Linear(24, 12), r=16, alpha=32.0, use_rslora=True, mixer_init="orthogonal")
    assert layer.scaling == 8.0
    M = layer.lora_M.detach()
    torch.testing.assert_close(M @ M.T, torch.eye(16), rtol=0, atol=1e-5)
    with torch.no_grad():
        layer.lora_B.normal_()
    torch.testing.assert_close(layer.delta_weight(), 8.0 * layer.lora_B @ M @ layer.lora_A, rtol=1e-5, atol=1e-5)

    kaiming = MoSLoRALinear(nn.Linear(24, 12), r=16, alpha=32.0).lora_M.detach()
    bound = 1 / math.sqrt(16)  # kaiming_uniform_(a=sqrt(5)) draws from U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert kaiming.abs().max() <= bound and not torch.allclose(kaiming @ kaiming.T, torch.eye(16), atol=0.1)
