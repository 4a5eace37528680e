"""In the finetune setting gradients reach exactly A, M, B of every adapted layer and the projector; stage 1
trains the projector only. Uses the recipe's own set_trainable, on the tiny model."""
import pytest
import torch

from mm_moslora.model.build import build_model
from mm_moslora.train.args import parse_args
from mm_moslora.train.recipe import set_trainable
from tests.helpers import image_batch_loss


@pytest.mark.parametrize("adapter", ["moslora", "lora"])
def test_finetune_gradients_reach_adapters_and_projector_only(adapter):
    torch.manual_seed(0)
    model, _ = build_model()
    args = parse_args("finetune", ["--adapter", adapter, "--lora_r", "4", "--lora_dropout", "0.1"])
    config = set_trainable(model, args, torch.float32)
    assert config.adapter == adapter
    with torch.no_grad():  # B = 0 at init would leave A and M without gradient
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)
    image_batch_loss(model).backward()
    expected = {"lora_A", "lora_B"} | ({"lora_M"} if adapter == "moslora" else set())
    n_adapted = 0
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name.startswith("projector.") or leaf in expected:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            n_adapted += leaf == "lora_A"
        else:
            assert not p.requires_grad and p.grad is None, name
    n_layers = model.llm.config.num_hidden_layers
    assert n_adapted == 7 * n_layers  # q,k,v,o,gate,up,down in every decoder block


def test_pretrain_trains_the_projector_only():
    torch.manual_seed(0)
    model, _ = build_model()
    assert set_trainable(model, parse_args("pretrain", []), torch.float32) is None
    image_batch_loss(model).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.startswith("projector."), name


def test_target_module_names_and_regex():
    torch.manual_seed(0)
    model, _ = build_model()
    set_trainable(model, parse_args("finetune", ["--lora_target_modules", "q_proj, v_proj", "--lora_r", "2"]),
                  torch.float32)
    adapted = {n.rsplit(".", 2)[-2] for n, _ in model.named_parameters() if n.endswith("lora_A")}
    assert adapted == {"q_proj", "v_proj"}
    model, _ = build_model()
    set_trainable(model, parse_args("finetune", ["--lora_target_modules", r".*\.layers\.0\.mlp\.down_proj",
                                                 "--lora_r", "2"]), torch.float32)
    assert [n for n, _ in model.named_parameters() if n.endswith("lora_A")] == ["llm.model.layers.0.mlp.down_proj.lora_A"]
