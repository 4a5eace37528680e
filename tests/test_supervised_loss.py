"""MultimodalLM computes the training loss from supervised positions only; it must equal Hugging Face's loss
(mean next-token cross-entropy over labels != -100), value and gradients."""
import torch

from mm_moslora.adapters import AdapterConfig, inject_adapters
from mm_moslora.model.build import build_model
from mm_moslora.model.mm_model import IMAGE_TOKEN_ID


def test_selected_logits_loss_equals_hf_loss_and_gradients():
    torch.manual_seed(0)
    model, _ = build_model()
    inject_adapters(model.llm, AdapterConfig(r=4, alpha=8, dropout=0.0))
    for module in model.llm.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B, std=0.02)
    n_img = model.num_image_tokens
    ids = torch.randint(5, 700, (3, n_img + 30))
    ids[:, 1:1 + n_img] = IMAGE_TOKEN_ID
    labels = ids.clone()
    labels[:, :n_img + 8] = -100
    labels[2, -10:] = -100
    attention_mask = torch.ones_like(ids)
    attention_mask[1, -4:] = 0
    labels[1, -4:] = -100
    pixels = torch.randn(3, 3, model.vision.image_size, model.vision.image_size)
    params = [p for p in model.parameters() if p.requires_grad]

    ours = model(ids, attention_mask, pixels, labels).loss
    ours_grads = torch.autograd.grad(ours, params)
    hf = model.llm(inputs_embeds=model.embed(ids, pixels), attention_mask=attention_mask, labels=labels).loss
    hf_grads = torch.autograd.grad(hf, params)

    torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours_grads, hf_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert ours.item() > 0
