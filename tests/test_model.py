"""The interest Transformer on hand-built batches: causality, one encoding per unique item, learning."""

import numpy as np
import pytest
import torch

from interestformer.datasets.pipeline import left_pad
from interestformer.models.interest_former import (
    DataSpec, ImageEncoderConfig, InterestFormer, ModelConfig, TextEncoderConfig,
)

SPEC = DataSpec(num_items=30, num_event_types=3, max_seq_len=8, text_vocab_size=50, text_max_tokens=6, image_size=16)


def tiny_model(**overrides) -> InterestFormer:
    cfg = ModelConfig(
        d_model=16, n_layers=2, n_heads=2, dropout=0.0,
        text=TextEncoderConfig(hidden_size=16, num_layers=1, num_heads=2),
        image=ImageEncoderConfig(hidden_size=16, num_layers=1, num_heads=2, patch_size=8),
        **overrides,
    )
    torch.manual_seed(0)
    return InterestFormer(cfg, SPEC).eval()


def batch_of(histories: list[list[int]], seed: int = 0) -> dict:
    """A packed batch as datasets/pipeline.py makes it, with random content per item."""
    rng = np.random.default_rng(seed)
    history = torch.from_numpy(left_pad([np.array(h[:-1]) for h in histories], SPEC.max_seq_len))
    targets = torch.from_numpy(left_pad([np.array(h[1:]) for h in histories], SPEC.max_seq_len))
    unique = torch.unique(torch.cat([history.ravel(), targets.ravel(), torch.tensor([0])]))
    content_rng = np.random.default_rng(1234)  # item content depends on the item only
    tokens = torch.from_numpy(content_rng.integers(5, SPEC.text_vocab_size, (SPEC.num_items + 1, SPEC.text_max_tokens)))
    pixels = torch.from_numpy(content_rng.integers(0, 256, (SPEC.num_items + 1, 3, 16, 16), dtype=np.uint8))
    return {
        "history": history,
        "event_types": (history > 0).long() * torch.from_numpy(rng.integers(1, 4, history.shape)),
        "targets": targets,
        "unique_items": unique,
        "text_tokens": tokens[unique],
        "text_mask": torch.ones(len(unique), SPEC.text_max_tokens, dtype=torch.long),
        "pixels": pixels[unique],
        "has_image": unique % 5 != 0,  # some items have no usable image
    }


def test_future_items_never_change_earlier_positions():
    model = tiny_model()
    history = torch.tensor([[0, 0, 3, 7, 9, 4, 12, 5]])  # left-padded, oldest first
    event_types = (history > 0).long()
    vectors = torch.randn(1, 8, 16)
    future_history, future_vectors = history.clone(), vectors.clone()
    future_history[0, -2:] = torch.tensor([21, 22])  # the last two events become other items
    future_vectors[0, -2:] = torch.randn(2, 16)
    with torch.no_grad():
        before = model.encode_users(vectors, history, event_types)
        after = model.encode_users(future_vectors, future_history, event_types)
    assert torch.equal(before[0, :-2], after[0, :-2])  # the past is untouched, bit for bit
    assert not torch.allclose(before[0, -1], after[0, -1], atol=1e-4)  # the changed positions move


def test_padding_does_not_leak_into_real_positions():
    model = tiny_model()
    short = batch_of([[3, 7, 9]])
    long = batch_of([[3, 7, 9], [1, 2, 4, 6, 10, 11, 13]])
    with torch.no_grad():
        a = model.user_vectors(short)[0]
        b = model.user_vectors(long)[0]
    assert torch.allclose(a, b, atol=1e-5)


def test_each_unique_item_is_encoded_once_per_step():
    model = tiny_model()
    calls = {"text": 0, "image": 0}
    model.item_encoder.text_encoder.register_forward_hook(lambda m, i, o: calls.__setitem__("text", calls["text"] + o.shape[0]))
    model.item_encoder.image_encoder.register_forward_hook(lambda m, i, o: calls.__setitem__("image", calls["image"] + o.shape[0]))
    batch = batch_of([[3, 7, 3, 7, 3, 9], [7, 7, 3, 12], [3, 3, 3, 3]])  # heavy repetition
    model.train()
    model(batch).backward()
    unique = len(batch["unique_items"])
    assert calls["text"] == unique
    assert calls["image"] == int(batch["has_image"].sum())


@pytest.mark.parametrize("overrides", [{}, {"use_item_id": False}])
def test_loss_falls_when_overfitting_a_batch(overrides):
    model = tiny_model(**overrides).train()
    batch = batch_of([[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15, 16, 17, 18, 19, 20, 21]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_config_needs_at_least_one_item_input():
    from interestformer import ConfigError

    with pytest.raises(ConfigError, match="use_item_id"):
        ModelConfig(use_item_id=False, text=TextEncoderConfig(enabled=False), image=ImageEncoderConfig(enabled=False))
